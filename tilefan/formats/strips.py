"""libvips' buffers while it streams one image top to bottom: rows, not hundreds of rows.

A sequential decode (a JPEG, a PNG) written by ``tiffsave`` holds, besides the writer's row of
TIFF tiles, buffers whose height libvips derives from its processing tile height (128 rows):
the loader's line cache (4 x 128 rows), the two buffers of the writer's sink (2 x 128 rows)
and regions between them, 928 rows as wide as the image in all. At 44,721 px of 8-bit RGB that
is 119 MB, against 22.5 MB (176 rows) with a tile height of 16 (docs/benchmarks.md, "Where the
transcode's memory goes"). libvips sets that height only from its command-line options, which
it parses with GLib's option parser; nothing in pyvips reaches it, so the options are parsed
here through the library pyvips loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import threading
from collections.abc import Iterator

__all__ = ["STREAMING_TILE_HEIGHT", "thin_strips"]

STREAMING_TILE_HEIGHT = 16
"""libvips' processing tile height during a streamed transcode (libvips' default: 128)."""

_STREAMING_FATSTRIP_HEIGHT = 8
"""libvips' strip height: its sink's buffers are at least this many rows per thread, so
with two threads 16 rows each (the tile height's), not 32."""

_DEFAULTS = ("--vips-tile-height=128", "--vips-fatstrip-height=16")
"""libvips' own values (VIPS__TILE_HEIGHT, VIPS__FATSTRIP_HEIGHT), restored after."""

_LIBVIPS_NAME = re.compile(r"/libvips(-[0-9a-f]+)?\.so[.0-9]*$")

_lock = threading.Lock()
_streams = 0


@contextlib.contextmanager
def thin_strips() -> Iterator[None]:
    """libvips' buffers for pipelines built inside: a few rows of the image's width.

    The setting is libvips', for the whole process, and a pipeline already running in another
    thread breaks when it changes under it (libvips' "out of order read"). So it is changed
    only in a Lambda execution environment (``AWS_LAMBDA_FUNCTION_NAME`` set: on Lambda, and in
    the engine's function processes), which runs one invocation at a time; elsewhere (the
    engine's threads, a test) the transcode keeps libvips' defaults. The last stream out
    restores them.
    """
    global _streams
    if not os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        yield
        return
    with _lock:
        _streams += 1
        if _streams == 1:
            _parse_vips_options(
                f"--vips-tile-height={STREAMING_TILE_HEIGHT}",
                f"--vips-fatstrip-height={_STREAMING_FATSTRIP_HEIGHT}",
            )
    try:
        yield
    finally:
        with _lock:
            _streams -= 1
            if _streams == 0:
                _parse_vips_options(*_DEFAULTS)


def _parse_vips_options(*options: str) -> None:
    """Give libvips ``options`` as if on its command line; a libvips not found keeps its own."""
    lib = _libvips()
    if lib is None:
        return
    context = lib.g_option_context_new(b"")
    group = lib.g_option_group_new(b"vips", b"", b"", None, None)
    lib.vips_add_option_entries(group)
    lib.g_option_context_set_main_group(context, group)  # the context owns the group now
    arguments = [b"tilefan", *(option.encode() for option in options)]
    argv = (ctypes.c_char_p * (len(arguments) + 1))(*arguments, None)
    argc = ctypes.c_int(len(arguments))
    pointer = ctypes.cast(argv, ctypes.POINTER(ctypes.c_char_p))
    parsed = lib.g_option_context_parse(context, ctypes.byref(argc), ctypes.byref(pointer), None)
    lib.g_option_context_free(context)
    if not parsed:
        raise RuntimeError(f"libvips refused its options {options}")


@functools.cache
def _libvips() -> ctypes.CDLL | None:
    """The libvips pyvips loaded (pyvips-binary's copy or the system's), found by its mapping."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            path = next(
                (line.split()[-1] for line in maps if _LIBVIPS_NAME.search(line.rstrip())),
                None,
            )
    except OSError:
        return None
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    pointer, text = ctypes.c_void_p, ctypes.c_char_p
    lib.g_option_context_new.restype = pointer
    lib.g_option_context_new.argtypes = [text]
    lib.g_option_group_new.restype = pointer
    lib.g_option_group_new.argtypes = [text, text, text, pointer, pointer]
    lib.vips_add_option_entries.argtypes = [pointer]
    lib.g_option_context_set_main_group.argtypes = [pointer, pointer]
    lib.g_option_context_parse.restype = ctypes.c_int
    lib.g_option_context_parse.argtypes = [
        pointer,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.POINTER(text)),
        pointer,
    ]
    lib.g_option_context_free.argtypes = [pointer]
    return lib

"""A lazily produced image: rows of raw tiles served to libvips as an uncompressed TIFF stream.

JPEG, PNG and WebP encoders need the whole image in scanline order, but the merger only ever
has one or two rows of tiles. libvips reads an image from a `pyvips.SourceCustom`; with
``access="sequential"`` it reads an uncompressed strip TIFF's header, then its strips once, in
order. So the merger writes a TIFF header whose strip offsets are known in advance (the pixels
are uncompressed) and produces each strip's bytes, when libvips asks for them, from the row of
tiles in hand. libvips 8.18 loads no other uncompressed format from a source for every layout
tilefan's tiles carry: ``.v`` and raw load only from a file, pyvips-binary's libvips has no
PPM/PFM loader, PNG (even uncompressed) stops at 4 bands of 8 or 16 bits, matrix and CSV are
text. TIFF carries 1 to N bands of ``uchar`` to
``float``; ``double`` is refused by libvips' TIFF reader ("samples out of range"), which is why
tiles, stored as TIFF, cannot carry it either.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyvips

from tilefan.errors import TilefanError, UnsupportedImage

__all__ = ["CallbackGuard", "RowStream", "TileRow", "pixel_bytes", "strip_tiff_header"]

TileRow = Sequence[tuple[int, bytes]]
"""One row of tiles, left to right: each tile's width and its raw pixels, line after line."""

_SAMPLES = {
    # pixel format: (bits per sample, TIFF SampleFormat: 1 unsigned, 2 signed, 3 IEEE float)
    "uchar": (8, 1),
    "char": (8, 2),
    "ushort": (16, 1),
    "short": (16, 2),
    "uint": (32, 1),
    "int": (32, 2),
    "float": (32, 3),
}

_R = TypeVar("_R")

_SHORT, _LONG, _LONG8 = 3, 4, 16
_TYPE_BYTES = {_SHORT: 2, _LONG: 4, _LONG8: 8}
_TYPE_CODES = {_SHORT: "H", _LONG: "I", _LONG8: "Q"}
_CLASSIC_LIMIT = 2**32 - 1
_STRIP_BYTES = 2**20
"""About this many bytes per strip: libvips reads one strip per request."""


def pixel_bytes(bands: int, pixel_format: str) -> int:
    """Bytes of one pixel; `UnsupportedImage` for a layout a TIFF stream cannot carry."""
    if pixel_format not in _SAMPLES:
        raise UnsupportedImage(
            f"{pixel_format} pixels cannot be streamed to the encoder; "
            f"supported: {', '.join(_SAMPLES)}"
        )
    return bands * _SAMPLES[pixel_format][0] // 8


def strip_tiff_header(width: int, height: int, bands: int, pixel_format: str) -> bytes:
    """The header, IFD and tag arrays of an uncompressed strip TIFF; the pixels follow it.

    Photometric is min-is-black with every band past the first an unspecified extra sample,
    so any band count reads back as it was; the caller sets the interpretation.
    BigTIFF when the file passes 4 GiB.
    """
    line = width * pixel_bytes(bands, pixel_format)
    bits, sample_format = _SAMPLES[pixel_format]
    rows_per_strip = max(1, min(height, _STRIP_BYTES // line))
    strips = -(-height // rows_per_strip)
    big = 16 + 400 + 16 * strips + line * height > _CLASSIC_LIMIT
    offset_type = _LONG8 if big else _LONG
    tags: list[tuple[int, int, list[int] | None]] = [
        (256, _LONG, [width]),
        (257, _LONG, [height]),
        (258, _SHORT, [bits] * bands),
        (259, _SHORT, [1]),  # no compression
        (262, _SHORT, [1]),  # min-is-black
        (273, offset_type, None),  # strip offsets, filled below
        (277, _SHORT, [bands]),
        (278, _LONG, [rows_per_strip]),
        (279, offset_type, None),  # strip byte counts, filled below
        (284, _SHORT, [1]),  # chunky
        *([(338, _SHORT, [0] * (bands - 1))] if bands > 1 else []),
        (339, _SHORT, [sample_format] * bands),
    ]
    inline = 8 if big else 4
    entry, start = ("<HHQ", 16) if big else ("<HHI", 8)
    ifd_bytes = (8 + 20 * len(tags) + 8) if big else (2 + 12 * len(tags) + 4)

    def count(values: list[int] | None) -> int:
        return strips if values is None else len(values)

    arrays_at = start + ifd_bytes
    data_start = arrays_at + sum(
        size + size % 2
        for _, kind, values in tags
        if (size := count(values) * _TYPE_BYTES[kind]) > inline
    )
    filled = {
        273: [data_start + strip * rows_per_strip * line for strip in range(strips)],
        279: [
            min(rows_per_strip, height - strip * rows_per_strip) * line for strip in range(strips)
        ],
    }
    header = bytearray(
        b"II" + (struct.pack("<HHHQ", 43, 8, 0, start) if big else struct.pack("<HI", 42, start))
    )
    header += struct.pack("<Q" if big else "<H", len(tags))
    arrays = bytearray()
    for tag, kind, values in tags:
        numbers = filled[tag] if values is None else values
        packed = struct.pack(f"<{len(numbers)}{_TYPE_CODES[kind]}", *numbers)
        if len(packed) > inline:
            value = struct.pack("<Q" if big else "<I", arrays_at + len(arrays))
            arrays += packed + b"\0" * (len(packed) % 2)
        else:
            value = packed.ljust(inline, b"\0")
        header += struct.pack(entry, tag, kind, len(numbers)) + value
    header += struct.pack("<Q" if big else "<I", 0) + arrays
    if len(header) != data_start:
        raise TilefanError(f"TIFF header is {len(header)} bytes, expected {data_start}")
    return bytes(header)


class CallbackGuard:
    """Wraps Python callbacks that libvips calls: the first exception is kept in `error`.

    An exception raised through a C callback would only be printed; libvips instead gets a
    failure value, fails the operation, and the caller raises `error`.
    """

    def __init__(self) -> None:
        self.error: Exception | None = None

    def wrap(self, call: Callable[..., _R], failed: _R) -> Callable[..., _R]:
        """``call``, answering ``failed`` once it (or an earlier call) has raised."""

        def guarded(*args: Any) -> _R:
            if self.error is not None:
                return failed
            try:
                return call(*args)
            except Exception as e:  # kept, and raised by whoever ran libvips
                self.error = e
                return failed

        return guarded


@dataclass
class _Row:
    """The row of tiles being served: its first line, height and tiles."""

    top: int
    height: int
    tiles: TileRow


class RowStream:
    """An uncompressed TIFF of ``width`` x ``height`` whose pixels come from rows of tiles.

    ``rows`` yields the tile rows top to bottom, each ``tile_height`` lines tall (the last may
    be shorter). Only the row being read is held here; a read behind it is an error, which
    libvips' sequential TIFF reader never makes (it reads the header, then strips in order).
    """

    def __init__(
        self,
        rows: Iterator[TileRow],
        *,
        width: int,
        height: int,
        bands: int,
        pixel_format: str,
        tile_height: int,
    ) -> None:
        self._rows = rows
        self._pixel = pixel_bytes(bands, pixel_format)
        self._line = width * self._pixel
        self._height = height
        self._tile_height = tile_height
        self._header = strip_tiff_header(width, height, bands, pixel_format)
        self.size = len(self._header) + self._line * height
        self._position = 0
        self._row = _Row(top=0, height=0, tiles=())
        self.guard = CallbackGuard()
        """What went wrong producing pixels: libvips only sees the stream end early."""

    def source(self) -> pyvips.SourceCustom:
        """A libvips source over this stream, with read and seek (seek keeps libvips lazy)."""
        source = pyvips.SourceCustom()
        source.on_read(self.guard.wrap(self.read, b""))
        source.on_seek(self.guard.wrap(self.seek, -1))
        return source

    def image(self) -> pyvips.Image:
        """The image, opened for one pass top to bottom.

        A strip that cannot be produced must fail the encoder: libvips' default is to warn
        and carry on with black pixels.
        """
        return pyvips.Image.new_from_source(self.source(), "", access="sequential", fail_on="error")

    def seek(self, offset: int, whence: int) -> int:
        """Move the read position, as `io.IOBase.seek`; a position anywhere is accepted."""
        base = {0: 0, 1: self._position, 2: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, length: int) -> bytes:
        """Up to ``length`` bytes at the position: header bytes, or lines of the current row."""
        position = self._position
        if position < len(self._header):
            chunk = self._header[position : position + length]
        else:
            chunk = self._pixels(position - len(self._header), length)
        self._position = position + len(chunk)
        return chunk

    def _pixels(self, offset: int, length: int) -> bytes:
        line, start = divmod(offset, self._line)
        if line >= self._height:
            return b""
        self._advance_to(line)
        lines = -(-(start + length) // self._line)
        last = min(self._row.top + self._row.height, line + lines)
        chunk = b"".join(self._line_bytes(y) for y in range(line, last))
        return chunk[start : start + length]

    def _line_bytes(self, y: int) -> bytes:
        local = y - self._row.top
        return b"".join(
            pixels[local * width * self._pixel : (local + 1) * width * self._pixel]
            for width, pixels in self._row.tiles
        )

    def _advance_to(self, line: int) -> None:
        if line < self._row.top:
            raise TilefanError(f"the encoder read line {line} after line {self._row.top}")
        while line >= self._row.top + self._row.height:
            top = self._row.top + self._row.height
            # The row is dropped before the next one is taken, so only one is held here.
            self._row = _Row(top, 0, ())
            self._row = _Row(top, min(self._tile_height, self._height - top), next(self._rows))

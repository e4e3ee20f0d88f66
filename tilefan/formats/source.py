"""Opening inputs safely: named errors for unreadable files, bombs refused from the header."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pyvips

from tilefan.errors import DamagedImage, TooManyPixels, UnsupportedImage, reason
from tilefan.formats.remote import ObjectSource

__all__ = ["open_checked", "upright"]


def open_checked(
    source: str | Path | ObjectSource,
    *,
    max_pixels: int | None = None,
    max_pixels_per_byte: float | None = None,
    access: str = "random",
    page: int = 0,
) -> pyvips.Image:
    """Open one page of an image, a file or an object read by range, reading its header.

    Refuses, before any pixel is decoded, a header that declares more than ``max_pixels`` or
    more than ``max_pixels_per_byte`` pixels per byte of file (a decompression bomb).
    """
    if isinstance(source, ObjectSource):
        name, size, head = source.name, source.remote.size, source.head
    else:
        path = Path(source)
        name, size = path.name, path.stat().st_size
        head = functools.partial(_file_head, path)
    if size == 0:
        raise UnsupportedImage(f"{name} is empty")
    # Only multi-page loaders take a page; the first needs no option.
    options: dict[str, Any] = {
        "access": access,
        "fail_on": "error",
        **({"page": page} if page else {}),
    }
    try:
        # "error", not "truncated": a TIFF whose strips are cut short is a read error to
        # libtiff, not a truncation to libvips, and would decode with the missing rows black.
        if isinstance(source, ObjectSource):
            image = pyvips.Image.new_from_source(source.source, "", **options)
        else:
            image = pyvips.Image.new_from_file(str(source), **options)
    except pyvips.Error as e:
        if isinstance(source, ObjectSource) and source.failure is not None:
            raise source.failure from e
        if "not in a known format" not in str(e) and "is not a known" not in str(e):
            raise DamagedImage(f"{name} could not be read: {reason(e)}") from e
        claimed = _claimed_format(head(16))
        if claimed is not None:
            # libvips says "not a known format" when a loader's own check reads past the
            # signature and fails, as for a TIFF cut before its directory: damaged, not foreign.
            raise DamagedImage(
                f"{name} starts like a {claimed} file but could not be read: it is damaged "
                "or cut short"
            ) from e
        raise UnsupportedImage(f"{name} is not an image format tilefan reads") from e
    if isinstance(source, ObjectSource) and source.failure is not None:
        raise source.failure  # a failed read that the loader took as a warning
    pixels = image.width * image.height
    if max_pixels is not None and pixels > max_pixels:
        raise TooManyPixels(
            f"{name} declares {image.width}x{image.height} = {pixels:,} pixels; "
            f"the limit is {max_pixels:,}"
        )
    if max_pixels_per_byte is not None and pixels / size > max_pixels_per_byte:
        raise TooManyPixels(
            f"{name} declares {pixels:,} pixels in {size:,} bytes, more than "
            f"{max_pixels_per_byte:,.0f} pixels per byte: refused as a decompression bomb"
        )
    return image


def upright(image: pyvips.Image) -> pyvips.Image:
    """Apply and drop the EXIF orientation, so results display the way the input did."""
    return image.autorot() if image.get_typeof("orientation") else image


_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"II+\x00", 0, "BigTIFF"),
    (b"MM\x00+", 0, "BigTIFF"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WebP"),
)
"""Signatures of formats every libvips build reads (bytes, offset, name)."""


def _file_head(path: Path, length: int) -> bytes:
    with path.open("rb") as stream:
        return stream.read(length)


def _claimed_format(head: bytes) -> str | None:
    """The format whose signature ``head`` starts with, if it is one libvips always reads."""
    for signature, offset, format_name in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return format_name
    return None

"""Opening inputs safely: named errors for unreadable files, bombs refused from the header."""

from __future__ import annotations

from pathlib import Path

import pyvips

from tilefan.errors import (
    DamagedImage,
    OutOfDisk,
    TooManyPixels,
    UnsupportedImage,
    is_out_of_disk,
    reason,
)

__all__ = ["decode_to_scratch", "open_checked", "upright"]


def open_checked(
    path: str | Path,
    *,
    max_pixels: int | None = None,
    max_pixels_per_byte: float | None = None,
    access: str = "random",
) -> pyvips.Image:
    """Open the first page of an image, reading only its header.

    Refuses, before any pixel is decoded, a header that declares more than ``max_pixels`` or
    more than ``max_pixels_per_byte`` pixels per byte of file (a decompression bomb).
    """
    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise UnsupportedImage(f"{name} is empty")
    try:
        # "error", not "truncated": a TIFF whose strips are cut short is a read error to
        # libtiff, not a truncation to libvips, and would decode with the missing rows black.
        image = pyvips.Image.new_from_file(str(path), access=access, fail_on="error")
    except pyvips.Error as e:
        if "is not a known file format" not in str(e):
            raise DamagedImage(f"{name} could not be read: {reason(e)}") from e
        claimed = _claimed_format(path)
        if claimed is not None:
            # libvips says "not a known format" when a loader's own check reads past the
            # signature and fails, as for a TIFF cut before its directory: damaged, not foreign.
            raise DamagedImage(
                f"{name} starts like a {claimed} file but could not be read: it is damaged "
                "or cut short"
            ) from e
        raise UnsupportedImage(f"{name} is not an image format tilefan reads") from e
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


def decode_to_scratch(image: pyvips.Image, path: Path) -> pyvips.Image:
    """Decode the whole image once, top to bottom, into an uncompressed file that maps.

    Formats such as JPEG and PNG only decode from the top; cutting tiles straight from them
    would decode again per tile. The scratch copy gives every tile random access at no cost.
    """
    try:
        image.write_to_file(str(path))
    except pyvips.Error as e:
        if is_out_of_disk(e):
            raise OutOfDisk(f"the decoded image did not fit the scratch space: {reason(e)}") from e
        raise DamagedImage(f"the image could not be decoded: {reason(e)}") from e
    return upright(pyvips.Image.new_from_file(str(path)))


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


def _claimed_format(path: Path) -> str | None:
    """The format whose signature the file starts with, if it is one libvips always reads."""
    with path.open("rb") as stream:
        head = stream.read(16)
    for signature, offset, format_name in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return format_name
    return None

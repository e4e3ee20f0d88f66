"""Output formats: how the merger saves the assembled image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyvips

__all__ = ["OUTPUT_FORMATS", "OutputFormat", "SavedOutput", "format_for_path", "save_output"]

OutputFormat = Literal["tiff", "jpeg", "png", "webp", "dz", "stats"]

OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    "tiff": ("tif", "image/tiff"),
    "jpeg": ("jpg", "image/jpeg"),
    "png": ("png", "image/png"),
    "webp": ("webp", "image/webp"),
    "dz": ("zip", "application/zip"),
    "stats": ("json", "application/json"),
}
"""Each format's file extension and content type. `dz` is a DeepZoom pyramid in a zip;
`stats` is libvips' statistics of the result as JSON (written by the statistics pass)."""

_EXTENSIONS = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".webp": "webp",
    ".zip": "dz",
    ".dzi": "dz",
    ".json": "stats",
}

_BIGTIFF_ABOVE = 3 * 2**30
"""Classic TIFF addresses 4 GiB; past 3 GiB of pixels we write BigTIFF to be safe."""


@dataclass(frozen=True)
class SavedOutput:
    """A saved result on local disk."""

    path: Path
    extension: str
    content_type: str


def format_for_path(path: str | Path) -> str | None:
    """The output format a file name asks for, or None."""
    return _EXTENSIONS.get(Path(path).suffix.lower())


def save_output(
    image: pyvips.Image, directory: Path, output_format: str, options: Mapping[str, Any]
) -> SavedOutput:
    """Save ``image`` in ``output_format`` under ``directory``, streaming top to bottom.

    Options: tiff ``compression`` (default deflate, lossless), ``pyramid``; jpeg and webp
    ``quality``; webp ``lossless``.
    """
    extension, content_type = OUTPUT_FORMATS[output_format]
    path = directory / f"result.{extension}"
    quality = int(options.get("quality", 90))
    if output_format == "tiff":
        raw_bytes = image.width * image.height * image.bands * _sample_bytes(image.format)
        image.tiffsave(
            str(path),
            tile=True,
            tile_width=256,
            tile_height=256,
            compression=options.get("compression", "deflate"),
            pyramid=bool(options.get("pyramid", False)),
            bigtiff=raw_bytes > _BIGTIFF_ABOVE,
        )
    elif output_format == "jpeg":
        image.jpegsave(str(path), Q=quality)
    elif output_format == "png":
        image.pngsave(str(path))
    elif output_format == "webp":
        image.webpsave(str(path), Q=quality, lossless=bool(options.get("lossless", False)))
    elif output_format == "dz":
        image.dzsave(str(path))  # a .zip name makes libvips write the pyramid as one zip
    else:
        raise ValueError(f"{output_format!r} is not an image format")
    return SavedOutput(path, extension, content_type)


def _sample_bytes(pixel_format: str) -> int:
    sizes = {"uchar": 1, "char": 1, "ushort": 2, "short": 2, "double": 8}
    return sizes.get(pixel_format, 4)

"""Output formats: their names, extensions and content types, and the streamed encoders."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pyvips

__all__ = [
    "OUTPUT_FORMATS",
    "STREAMED_FORMATS",
    "OutputFormat",
    "encode_to_target",
    "format_for_path",
]

OutputFormat = Literal["tiff", "jpeg", "png", "webp", "dz", "dzi", "iiif", "stats"]

OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    "tiff": ("tif", "image/tiff"),
    "jpeg": ("jpg", "image/jpeg"),
    "png": ("png", "image/png"),
    "webp": ("webp", "image/webp"),
    "dz": ("zip", "application/zip"),
    "dzi": ("dzi", "application/xml"),
    "iiif": ("json", "application/json"),
    "stats": ("json", "application/json"),
}
"""Each format's file extension and content type (a tile set's: its descriptor's). `dz` is a
DeepZoom pyramid in a zip, `dzi` the same as a `.dzi` and a folder of tiles, `iiif` an IIIF
Image API 3 level 0 set (`info.json` and tiles); `stats` is libvips' statistics of the result
as JSON (written by the statistics pass)."""

STREAMED_FORMATS = frozenset({"jpeg", "png", "webp"})
"""Formats encoded in one pass over the whole image, fed a row of tiles at a time."""

_EXTENSIONS = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".webp": "webp",
    ".zip": "dz",
    ".dzi": "dzi",
    ".json": "stats",
}


def format_for_path(path: str | Path) -> str | None:
    """The output format a file name asks for, or None."""
    return _EXTENSIONS.get(Path(path).suffix.lower())


def encode_to_target(
    image: pyvips.Image, target: pyvips.Target, output_format: str, options: Mapping[str, Any]
) -> None:
    """Encode ``image`` as jpeg, png or webp into ``target`` (one of `STREAMED_FORMATS`).

    Options: jpeg and webp ``quality`` (90 by default); webp ``lossless``.
    """
    quality = int(options.get("quality", 90))
    if output_format == "jpeg":
        image.jpegsave_target(target, Q=quality)
    elif output_format == "png":
        image.pngsave_target(target)
    elif output_format == "webp":
        image.webpsave_target(target, Q=quality, lossless=bool(options.get("lossless", False)))
    else:
        raise ValueError(f"{output_format} is not one of {', '.join(sorted(STREAMED_FORMATS))}")

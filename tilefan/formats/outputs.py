"""Output formats: how the merger saves the assembled image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyvips

from tilefan.errors import TilefanError

__all__ = [
    "OUTPUT_FORMATS",
    "STREAMED_FORMATS",
    "OutputFormat",
    "SavedOutput",
    "UnsupportedOutput",
    "encode_to_target",
    "format_for_path",
    "save_output",
]

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
    ".json": "stats",
}

_NOT_WRITTEN = {
    ".dzi": "a .dzi output (a DeepZoom tile set) is not written yet; name the output .zip "
    "for the DeepZoom pyramid in one zip",
}
"""Extensions that name a format tilefan does not write, with what to use instead."""


class UnsupportedOutput(TilefanError):
    """The output's name asks for a format tilefan does not write."""

    code = "UNSUPPORTED_OUTPUT"


@dataclass(frozen=True)
class SavedOutput:
    """A saved result on local disk."""

    path: Path
    extension: str
    content_type: str


def format_for_path(path: str | Path) -> str | None:
    """The output format a file name asks for, or None; `UnsupportedOutput` if never written."""
    suffix = Path(path).suffix.lower()
    if suffix in _NOT_WRITTEN:
        raise UnsupportedOutput(_NOT_WRITTEN[suffix])
    return _EXTENSIONS.get(suffix)


def save_output(
    image: pyvips.Image, directory: Path, output_format: str, options: Mapping[str, Any]
) -> SavedOutput:
    """Save ``image`` as a DeepZoom zip under ``directory``: the one format still saved whole.

    TIFF results are assembled around the workers' tiles (`tilefan.stages.tiff_output`), and
    JPEG, PNG and WebP are streamed (`encode_to_target`).
    """
    if output_format != "dz":
        raise ValueError(f"{output_format} results are not saved whole")
    extension, content_type = OUTPUT_FORMATS[output_format]
    path = directory / f"result.{extension}"
    image.dzsave(str(path))  # a .zip name makes libvips write the pyramid as one zip
    return SavedOutput(path, extension, content_type)


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

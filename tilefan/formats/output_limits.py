"""What a streamed result (jpeg, png, webp) can be: format limits, the merger's time and memory.

A job that cannot succeed is refused before any tile is processed: at creation when the
request declares the input's dimensions (the API's ``input.width`` and ``input.height``;
`tilefan run` reads them from the file's header), else in the splitter as soon as it has read
the upload's header. The output size follows from the chain's geometry (`stage_sizes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tilefan.errors import OutputTooLarge
from tilefan.formats.outputs import STREAMED_FORMATS
from tilefan.imaging.operations import Chain
from tilefan.imaging.plan import stage_sizes

__all__ = [
    "ENCODE_MEGAPIXELS_PER_SECOND",
    "ENCODE_SHARE",
    "MAX_SIDE",
    "MERGER_BASE_MB",
    "WEBP_BYTES_PER_PIXEL",
    "check_output",
    "check_output_of_input",
    "predicted_merge_seconds",
]

MAX_SIDE = {"jpeg": 65_535, "webp": 16_383}
"""The largest width or height each format can store (JPEG's 16-bit fields; WebP's 14-bit)."""

ENCODE_MEGAPIXELS_PER_SECOND = {
    "jpeg": 30.0,
    "png": 5.0,
    "webp": 1.5,
    "webp-lossless": 0.08,
}
"""One core's encoding rate of 8-bit RGB, rounded down from what docs/design.md records.

libvips encodes these formats on one thread, so the rate is that of one core whatever the
merger's memory size. PNG's rate is per 3 bytes of pixel: a 16-bit or 4-band PNG takes longer.
"""

WEBP_BYTES_PER_PIXEL = 40
"""Memory of a webp encoding per pixel of the result: libwebp encodes a whole picture
(measured 39 bytes a pixel through libvips 8.18 at default settings; docs/design.md)."""

MERGER_BASE_MB = 250
"""The merger's memory before it encodes: Python, libvips, boto3 and the tile rows in hand."""

ENCODE_SHARE = 0.75
"""Of the merger's timeout, the share encoding may take: the rest is for fetching the first
tiles, the last parts' upload and the bookkeeping, with a margin for a slower machine."""


def predicted_merge_seconds(
    output_format: str,
    options: Mapping[str, Any],
    width: int,
    height: int,
    *,
    bands: int = 3,
    pixel_format: str = "uchar",
) -> float:
    """Seconds the merger is expected to encode a ``width`` x ``height`` result."""
    lossless_webp = output_format == "webp" and options.get("lossless")
    rate = ENCODE_MEGAPIXELS_PER_SECOND["webp-lossless" if lossless_webp else output_format]
    # PNG stores 8 or 16 bits a sample, as many bands as the image has.
    png_bytes = bands * (1 if pixel_format in ("uchar", "char") else 2)
    scale = max(1.0, png_bytes / 3) if output_format == "png" else 1.0
    return width * height / 1e6 / rate * scale


def check_output(
    output_format: str,
    options: Mapping[str, Any],
    width: int,
    height: int,
    *,
    merger_timeout: float,
    merger_memory_mb: int,
    bands: int = 3,
    pixel_format: str = "uchar",
) -> None:
    """Raise `OutputTooLarge` when a ``width`` x ``height`` result cannot be made."""
    if output_format not in STREAMED_FORMATS:
        return
    limit = MAX_SIDE.get(output_format)
    if limit is not None and max(width, height) > limit:
        raise OutputTooLarge(
            f"the result would be {width:,}x{height:,} pixels; {output_format} stores at most "
            f"{limit:,} a side: choose tiff, or a chain that makes it smaller"
        )
    if output_format == "webp":
        needed_mb = MERGER_BASE_MB + width * height * WEBP_BYTES_PER_PIXEL / 2**20
        if needed_mb > merger_memory_mb:
            raise OutputTooLarge(
                f"encoding a {width:,}x{height:,} webp needs about {needed_mb:,.0f} MB (libwebp "
                f"holds the whole picture); the merger has {merger_memory_mb:,} MB: choose "
                "jpeg, png or tiff, or a chain that makes it smaller"
            )
    seconds = predicted_merge_seconds(
        output_format, options, width, height, bands=bands, pixel_format=pixel_format
    )
    if seconds > ENCODE_SHARE * merger_timeout:
        raise OutputTooLarge(
            f"encoding a {width:,}x{height:,} {output_format} would take about {seconds:,.0f} s "
            f"on one core; the merger has {merger_timeout:,.0f} s: choose tiff, or a chain "
            "that makes it smaller"
        )


def check_output_of_input(
    chain: Chain,
    output_format: str,
    options: Mapping[str, Any],
    width: int,
    height: int,
    *,
    merger_timeout: float,
    merger_memory_mb: int,
    bands: int = 3,
    pixel_format: str = "uchar",
) -> None:
    """`check_output` for the result ``chain`` makes of a ``width`` x ``height`` input."""
    out_width, out_height = stage_sizes(chain, width, height)[-1]
    check_output(
        output_format,
        options,
        out_width,
        out_height,
        merger_timeout=merger_timeout,
        merger_memory_mb=merger_memory_mb,
        bands=bands,
        pixel_format=pixel_format,
    )

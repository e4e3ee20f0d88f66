"""Benchmark inputs: reproducible synthetic images of a given size, made once and cached."""

from __future__ import annotations

import math
import time
from pathlib import Path

__all__ = ["synthetic_source", "synthetic_tiled_tiff"]

JPEG_QUALITY = 90


def synthetic_source(megapixels: float, workdir: Path, *, seed: int = 1) -> tuple[Path, float]:
    """A square sRGB JPEG of about ``megapixels`` MP (same pixels for the same size and seed).

    Returns the path and the seconds spent making it (0 when it was cached).
    """
    side = int(math.sqrt(megapixels * 1_000_000))
    path = workdir / f"synthetic-{side}x{side}-s{seed}-q{JPEG_QUALITY}.jpg"
    if path.exists() and path.stat().st_size > 0:
        return path, 0.0
    from tilefan.imaging.synthetic import synthetic_image

    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    partial = path.with_suffix(".partial.jpg")
    synthetic_image(side, side, seed=seed).jpegsave(str(partial), Q=JPEG_QUALITY)
    partial.rename(path)
    return path, time.monotonic() - started


def synthetic_tiled_tiff(megapixels: float, workdir: Path, *, seed: int = 1) -> tuple[Path, float]:
    """The same pixels as `synthetic_source` would have before JPEG, as a tiled TIFF that workers
    read by range, written as the splitter writes its transcode (256-px tiles, deflate level 1).

    Returns the path and the seconds spent making it (0 when it was cached).
    """
    from tilefan.formats.tiled import TRANSCODE_OPTIONS
    from tilefan.imaging.synthetic import synthetic_image

    side = int(math.sqrt(megapixels * 1_000_000))
    path = workdir / f"synthetic-{side}x{side}-s{seed}-tiled.tif"
    if path.exists() and path.stat().st_size > 0:
        return path, 0.0
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    partial = path.with_suffix(".partial.tif")
    synthetic_image(side, side, seed=seed).tiffsave(
        str(partial), tile_width=256, tile_height=256, **TRANSCODE_OPTIONS
    )
    partial.rename(path)
    return path, time.monotonic() - started

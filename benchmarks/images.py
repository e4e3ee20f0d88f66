"""Benchmark inputs: reproducible synthetic JPEGs of a given size, made once and cached."""

from __future__ import annotations

import math
import time
from pathlib import Path

__all__ = ["synthetic_source"]

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

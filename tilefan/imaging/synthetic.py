"""Reproducible synthetic images for the demo and the benchmarks."""

from __future__ import annotations

import pyvips

__all__ = ["synthetic_image"]


def synthetic_image(width: int, height: int, *, seed: int = 1) -> pyvips.Image:
    """An sRGB image with structure at many scales: Perlin noise per band, plus fine grain."""
    cell = max(16, min(width, height) // 8)
    bands = [
        pyvips.Image.perlin(width, height, cell_size=cell, uchar=True, seed=seed + band)
        for band in range(3)
    ]
    grain = pyvips.Image.gaussnoise(width, height, sigma=12, mean=0, seed=seed)
    image = bands[0].bandjoin(bands[1:]) + grain
    return image.cast("uchar").copy(interpretation="srgb")

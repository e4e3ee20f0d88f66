"""Helpers shared by every test layer: shared images, synthetic images, the whole-image
result, exact comparison."""

from __future__ import annotations

from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pyvips

from tilefan.imaging.operations import parse_chain

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images"
NO_SHARED = "../shared/images is absent (a fresh clone has no shared test images)"


REPOSITORY_IMAGES = Path(__file__).resolve().parent / "images"
"""Small real photographs shipped with the repository (their licences: images/README.md)."""


def repository_image_names() -> list[str]:
    """The real images every clone has."""
    return sorted(p.name for p in REPOSITORY_IMAGES.iterdir() if p.suffix.lower() != ".md")


def shared_image(name: str) -> Path:
    """A test image: one shipped in tests/images, else one from ../shared/images.

    A name from ../shared/images skips with the reason when that folder is absent.
    """
    if (REPOSITORY_IMAGES / name).is_file():
        return REPOSITORY_IMAGES / name
    path = SHARED_IMAGES / name
    if not path.exists():
        pytest.skip(
            NO_SHARED if not SHARED_IMAGES.exists() else f"{name} is not in {SHARED_IMAGES}"
        )
    return path


def shared_image_names() -> list[str]:
    """Every image file in ../shared/images (empty where the folder is absent)."""
    if not SHARED_IMAGES.exists():
        return []
    return sorted(p.name for p in SHARED_IMAGES.iterdir() if p.suffix.lower() != ".md")


def noise_image(
    width: int, height: int, bands: int = 3, fmt: str = "uchar", seed: int = 0
) -> pyvips.Image:
    """Random pixels: every neighbour matters, so any wrong halo or border shows."""
    rng = np.random.default_rng(seed)
    ranges = {
        "uchar": (0, 256, np.uint8),
        "char": (-128, 128, np.int8),
        "ushort": (0, 65536, np.uint16),
        "short": (-32768, 32768, np.int16),
    }
    if fmt == "float":
        pixels = rng.random((height, width, bands), dtype=np.float32) * 255
    else:
        low, high, dtype = ranges[fmt]
        pixels = rng.integers(low, high, (height, width, bands), dtype=dtype)
    image = pyvips.Image.new_from_array(pixels)
    interpretation = {1: "b-w", 2: "b-w", 3: "srgb", 4: "srgb"}.get(bands, "multiband")
    if fmt in ("ushort", "short") and bands >= 3:
        interpretation = "rgb16"
    elif fmt in ("ushort", "short"):
        interpretation = "grey16"
    return image.copy(interpretation=interpretation)


def assert_identical(expected: pyvips.Image, actual: pyvips.Image) -> None:
    """Same size, bands, format and every pixel, with where they first differ on failure."""
    assert (actual.width, actual.height, actual.bands) == (
        expected.width,
        expected.height,
        expected.bands,
    )
    assert actual.format == expected.format
    a, b = expected.numpy(), actual.numpy()
    if not np.array_equal(a, b):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        where = np.argwhere(diff.reshape(diff.shape[0], diff.shape[1], -1).max(axis=2) > 0)
        raise AssertionError(
            f"{len(where)} pixels differ, max {diff.max()}, first at (y, x) = {tuple(where[0])}"
        )


def whole(image: pyvips.Image, ops: list[dict[str, Any]]) -> pyvips.Image:
    """What libvips makes of the whole image with the chain ``ops``: what a job must equal."""
    return reduce(lambda im, step: step.apply(im), parse_chain(ops), image)


def libvips_error(detail: str) -> pyvips.Error:
    """A libvips failure as libvips reports one: a sentence, then the detail that says why.

    Without a detail, ``pyvips.Error`` takes libvips' process-wide error buffer, where another
    thread may have just left a line (pyvips looks properties up by provoking an error and
    clearing it), so an injected failure brings its own.
    """
    return pyvips.Error("unable to call the operation", detail)


def compaction_groups_of_two(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Make the second fan-out's groups two batches each; returns the list of the groups its
    tasks are given, filled as they run."""
    import tilefan.stages.compaction as compaction

    monkeypatch.setattr(compaction, "_MAX_GROUP", 2)
    groups: list[list[int]] = []
    real_compact = compaction.compact

    def compact(pipeline: Any, job_id: str, batches: list[int]) -> dict[str, Any]:
        groups.append(list(batches))
        return real_compact(pipeline, job_id, batches)

    monkeypatch.setattr(compaction, "compact", compact)
    return groups

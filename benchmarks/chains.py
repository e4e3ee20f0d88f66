"""The benchmark's operation chains, and what each means to the whole-image and dask-image peers."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CHAINS", "dask_chain"]

CHAINS: dict[str, list[dict[str, Any]]] = {
    # Pixel by pixel: no halo, so a tile reads exactly its own pixels.
    "point": [{"op": "linear", "a": 1.2, "b": -20, "uchar": True}, {"op": "invert"}],
    # The demo chain: a halo of a few pixels around every tile.
    "neighbourhood": [{"op": "gaussblur", "sigma": 2}, {"op": "sharpen", "sigma": 1}],
    # Pixels move: a tile reads a rotated, then 2x larger, source rectangle.
    "geometric": [{"op": "rot", "angle": "d90"}, {"op": "shrink", "hshrink": 2, "vshrink": 2}],
}

DASK_EQUIVALENT: dict[str, str] = {
    "point": "clip(1.2 x - 20) then 255 - x, per element (same arithmetic as libvips)",
    "neighbourhood": (
        "dask_image.ndfilters.gaussian_filter sigma 2, then an unsharp mask with sigma 1 per RGB "
        "band (libvips sharpens L* in LabS with a tone curve: same class of cost, not the same "
        "pixels)"
    ),
    "geometric": "da.rot90 clockwise, then 2x2 block mean with da.coarsen",
}


def dask_chain(name: str, image: Any) -> Any:
    """The peer's version of chain ``name`` on a dask array of shape (height, width, bands)."""
    import dask.array as da
    from dask_image import ndfilters  # type: ignore[import-untyped]

    if name == "point":
        scaled = da.clip(da.round(image.astype(np.float32) * 1.2 - 20), 0, 255)
        return (255 - scaled).astype(np.uint8)
    if name == "neighbourhood":
        # Float throughout, as libvips computes both steps in float before casting back.
        blurred = ndfilters.gaussian_filter(image.astype(np.float32), sigma=(2, 2, 0))
        soft = ndfilters.gaussian_filter(blurred, sigma=(1, 1, 0))
        return da.clip(da.round(2 * blurred - soft), 0, 255).astype(np.uint8)
    if name == "geometric":
        rotated = da.rot90(image, k=-1, axes=(0, 1))
        height, width = (rotated.shape[0] // 2) * 2, (rotated.shape[1] // 2) * 2
        shrunk = da.coarsen(np.mean, rotated[:height, :width], {0: 2, 1: 2}, trim_excess=True)
        return da.round(shrunk).astype(np.uint8)
    raise ValueError(f"no dask equivalent for chain {name!r}")

"""Running a chain on one tile, and the whole tiled path in one process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyvips

from tilefan.formats.source import open_checked, upright
from tilefan.imaging.geometry import Rect
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import ImageSpec, TilePlan, plan_tiles, stage_regions, stage_sizes

__all__ = ["assemble", "execute_tile", "process_tiled"]


def execute_tile(chain: Chain, source: ImageSpec, block: pyvips.Image, out: Rect) -> pyvips.Image:
    """Compute the output rectangle ``out`` from ``block``, the tile's clipped source rectangle.

    Every step sees exactly the pixels libvips would give it on the whole image, edge copies
    included, so the assembled tiles equal the whole-image result.
    """
    sizes = stage_sizes(chain, source.width, source.height)
    regions = stage_regions(chain, sizes, out)
    if (block.width, block.height) != (regions[0].w, regions[0].h):
        raise ValueError(f"block is {block.width}x{block.height}, the tile needs {regions[0]}")
    for step, (width, height), have, want in zip(chain, sizes, regions, regions[1:], strict=False):
        block = step.apply_region(block, have, width, height, want)
    return block


def assemble(plan: TilePlan, tiles: Sequence[pyvips.Image]) -> pyvips.Image:
    """Join output tiles, in plan order, into the output image."""
    joined = pyvips.Image.arrayjoin(list(tiles), across=plan.columns)
    if (joined.width, joined.height) == (plan.output_width, plan.output_height):
        return joined
    return joined.crop(0, 0, plan.output_width, plan.output_height)


def process_tiled(
    image: pyvips.Image | str | Path, ops: Any, *, tile_size: int = 1024
) -> pyvips.Image:
    """Plan, process every tile and assemble, all in this process: tiled equals whole."""
    if not isinstance(image, pyvips.Image):
        image = upright(open_checked(image))
    chain = parse_chain(ops)
    spec = ImageSpec.of(image)
    plan = plan_tiles(spec, chain, tile_size)
    outputs = [
        execute_tile(chain, spec, image.crop(*tile.source), tile.output) for tile in plan.tiles()
    ]
    return assemble(plan, outputs)

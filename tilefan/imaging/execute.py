"""Running a chain on one tile, and the whole tiled path in one process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyvips

from tilefan.formats.source import open_checked, upright
from tilefan.imaging.geometry import Rect
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import (
    ImageSpec,
    Tile,
    TilePlan,
    check_chain,
    plan_tiles,
    stage_regions,
    stage_sizes,
)
from tilefan.imaging.statistics import HISTOGRAM_FORMATS, Statistics

__all__ = [
    "StatisticsPass",
    "assemble",
    "execute_tile",
    "gather_statistics",
    "pass_plan",
    "process_tiled",
    "statistics_passes",
    "statistics_tiled",
    "tile_statistics",
]


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


@dataclass(frozen=True)
class StatisticsPass:
    """One pass over the image as it stands before step ``upto`` (``len(chain)``: the output)."""

    upto: int
    histogram: bool


def statistics_passes(
    chain: Chain, spec: ImageSpec, *, output_statistics: bool = False
) -> list[StatisticsPass]:
    """The passes a chain needs, in order: one per global step, then one for a ``stats`` output.

    Each global step needs the statistics of what the step before it made, so no two passes
    can share their tiles; a chain without global steps that writes an image needs none.
    """
    passes = [StatisticsPass(index, step.needs_histogram()) for index, step in chain.global_steps()]
    if output_statistics:
        layout = check_chain(chain, spec)
        passes.append(StatisticsPass(len(chain), layout.format in HISTOGRAM_FORMATS))
    return passes


def pass_plan(
    chain: Chain, spec: ImageSpec, tile_size: int, statistics: dict[int, Statistics], upto: int
) -> TilePlan:
    """The tile grid of the pass before step ``upto``, with earlier global steps bound."""
    return plan_tiles(spec, Chain(chain.bind(statistics)[:upto]), tile_size)


def tile_statistics(
    plan: TilePlan, block: pyvips.Image, tile: Tile, *, histogram: bool
) -> Statistics:
    """The partial statistics of one tile of a pass's plan."""
    result = execute_tile(plan.chain, plan.spec, block, tile.output)
    return Statistics.of_tile(result, tile.output.x, tile.output.y, histogram=histogram)


def gather_statistics(
    image: pyvips.Image, chain: Chain, tile_size: int, *, output_statistics: bool = False
) -> dict[int, Statistics]:
    """Run every statistics pass the chain needs over ``image``, tile by tile, in this process.

    The result maps each pass's ``upto`` to the statistics of the whole image at that point.
    """
    spec = ImageSpec.of(image)
    found: dict[int, Statistics] = {}
    for step in statistics_passes(chain, spec, output_statistics=output_statistics):
        plan = pass_plan(chain, spec, tile_size, found, step.upto)
        found[step.upto] = Statistics.combine(
            [
                tile_statistics(plan, image.crop(*tile.source), tile, histogram=step.histogram)
                for tile in plan.tiles()
            ]
        )
    return found


def _open(image: pyvips.Image | str | Path) -> pyvips.Image:
    return image if isinstance(image, pyvips.Image) else upright(open_checked(image))


def process_tiled(
    image: pyvips.Image | str | Path, ops: Any, *, tile_size: int = 1024
) -> pyvips.Image:
    """Plan, process every tile and assemble, all in this process: tiled equals whole.

    Global steps first get their statistics passes, then run bound to them, tile by tile.
    """
    image = _open(image)
    chain = parse_chain(ops)
    spec = ImageSpec.of(image)
    plan = plan_tiles(spec, chain, tile_size)
    bound = chain.bind(gather_statistics(image, chain, tile_size))
    outputs = [
        execute_tile(bound, spec, image.crop(*tile.source), tile.output) for tile in plan.tiles()
    ]
    return assemble(plan, outputs)


def statistics_tiled(
    image: pyvips.Image | str | Path, ops: Any, *, tile_size: int = 1024
) -> Statistics:
    """The statistics of the chain's output, tile by tile: what ``output.format: "stats"`` gives."""
    image = _open(image)
    chain = parse_chain(ops)
    plan_tiles(ImageSpec.of(image), chain, tile_size)
    return gather_statistics(image, chain, tile_size, output_statistics=True)[len(chain)]

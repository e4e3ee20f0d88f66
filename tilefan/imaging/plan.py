"""Tile plans: which source pixels each output tile reads, and where it lands."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyvips

from tilefan.errors import InvalidChain, InvalidTileSize, TileTooLarge, UnsupportedImage, reason
from tilefan.imaging.geometry import Rect
from tilefan.imaging.operations import MAX_BANDS, Chain, Operation

__all__ = [
    "MAX_TILE_SIZE",
    "MIN_OUTPUT_TILE",
    "MIN_TILE_SIZE",
    "SAMPLE_BYTES",
    "SUPPORTED_FORMATS",
    "ImageSpec",
    "Tile",
    "TilePlan",
    "check_chain",
    "check_worker_memory",
    "plan_tiles",
    "stage_regions",
    "stage_sizes",
]

MIN_TILE_SIZE = 64
MAX_TILE_SIZE = 8192
"""Tile sizes are accepted from 64 to 8192 pixels: a 8192 x 8192 RGBA float tile is 1 GiB."""

MIN_OUTPUT_TILE = 16
"""Chains that shrink the image get proportionally smaller output tiles, but not below this."""

SUPPORTED_FORMATS = frozenset(
    {"uchar", "char", "ushort", "short", "uint", "int", "float", "double"}
)


@dataclass(frozen=True)
class ImageSpec:
    """What the planner needs to know of an image: its size and pixel layout."""

    width: int
    height: int
    bands: int
    format: str
    interpretation: str = "multiband"

    @classmethod
    def of(cls, image: pyvips.Image) -> ImageSpec:
        """The spec of a loaded image."""
        return cls(image.width, image.height, image.bands, image.format, image.interpretation)

    @property
    def pixels(self) -> int:
        """Width times height."""
        return self.width * self.height

    def check(self) -> None:
        """Raise `UnsupportedImage` for pixel layouts tilefan does not process."""
        if self.format not in SUPPORTED_FORMATS:
            raise UnsupportedImage(
                f"pixel format {self.format!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_FORMATS))}"
            )
        if self.width < 1 or self.height < 1:
            raise UnsupportedImage("the image has no pixels")


@dataclass(frozen=True)
class Tile:
    """One unit of work: read ``source`` from the input, produce ``output`` in the result."""

    index: int
    source: Rect
    output: Rect

    def to_compact(self) -> list[int]:
        """Nine integers: index, source rectangle, output rectangle."""
        return [self.index, *self.source, *self.output]

    @classmethod
    def from_compact(cls, values: Sequence[int]) -> Tile:
        """Inverse of `to_compact`."""
        index, sx, sy, sw, sh, ox, oy, ow, oh = values
        return cls(index, Rect(sx, sy, sw, sh), Rect(ox, oy, ow, oh))


def stage_sizes(chain: Sequence[Operation], width: int, height: int) -> list[tuple[int, int]]:
    """The image size before the first step and after every step."""
    sizes = [(width, height)]
    for index, step in enumerate(chain):
        sizes.append(step.output_size(*sizes[-1]))
        if min(sizes[-1]) < 1:
            raise InvalidChain(
                f"step {index} ({step.model_dump()['op']}): a {width}x{height} image "
                "shrinks to nothing"
            )
    return sizes


def stage_regions(
    chain: Sequence[Operation], sizes: Sequence[tuple[int, int]], out: Rect
) -> list[Rect]:
    """For one output rectangle, the rectangle each stage must produce, clipped to that stage.

    Element ``i`` is what stage ``i`` (0 = the source) must provide; the last is ``out``.
    """
    regions = [out]
    for step, (width, height) in zip(reversed(chain), reversed(sizes[:-1]), strict=True):
        needed = step.input_region(regions[-1], width, height)
        regions.append(needed.clip(width, height))
    regions.reverse()
    return regions


def check_chain(chain: Chain, spec: ImageSpec) -> ImageSpec:
    """Run the chain on a stand-in of the same size and layout, so incompatible steps fail early.

    The stand-in is libvips' lazy black image and only one output pixel of each step is
    computed, so this costs microseconds whatever the image size. Returns the layout of the
    chain's output.
    """
    probe = (
        pyvips.Image.black(spec.width, spec.height, bands=spec.bands)
        .cast(spec.format)
        .copy(interpretation=spec.interpretation)
    )
    for index, step in enumerate(chain):
        try:
            probe = step.apply(probe)
            probe.crop(0, 0, 1, 1).copy_memory()
        except pyvips.Error as e:
            raise InvalidChain(
                f"step {index} ({step.model_dump()['op']}): cannot apply to a "
                f"{probe.bands}-band {probe.format} image: {reason(e)}"
            ) from e
        if probe.bands > MAX_BANDS:
            raise InvalidChain(
                f"step {index} ({step.model_dump()['op']}): makes a {probe.bands}-band image; "
                f"at most {MAX_BANDS} bands are supported"
            )
    return ImageSpec.of(probe)


@dataclass(frozen=True)
class TilePlan:
    """The tile grid over the output image, and the source rectangle of every tile."""

    spec: ImageSpec
    chain: Chain
    tile_size: int
    output_tile: int
    output_width: int
    output_height: int
    rows: int
    columns: int
    output: ImageSpec
    """The chain's result: its size, bands, sample format and interpretation."""

    @property
    def output_interpretation(self) -> str:
        """The result's interpretation (what a TIFF result's tags say)."""
        return self.output.interpretation

    @property
    def tile_count(self) -> int:
        """How many tiles the plan has."""
        return self.rows * self.columns

    def tile(self, index: int) -> Tile:
        """The tile at ``index`` (row-major)."""
        row, column = divmod(index, self.columns)
        x, y = column * self.output_tile, row * self.output_tile
        out = Rect(x, y, self.output_tile, self.output_tile).clip(
            self.output_width, self.output_height
        )
        sizes = stage_sizes(self.chain, self.spec.width, self.spec.height)
        return Tile(index, stage_regions(self.chain, sizes, out)[0], out)

    def tiles(self) -> Iterator[Tile]:
        """Every tile, row by row."""
        return (self.tile(index) for index in range(self.tile_count))

    def manifest(self, tiles_per_item: int) -> list[dict[str, Any]]:
        """The Distributed Map's items: batches of compact tiles, a few bytes per tile."""
        compact = [tile.to_compact() for tile in self.tiles()]
        return [
            {"batch": number, "tiles": compact[start : start + tiles_per_item]}
            for number, start in enumerate(range(0, len(compact), tiles_per_item))
        ]


def plan_tiles(
    spec: ImageSpec,
    chain: Chain,
    tile_size: int,
    *,
    output_tile_rule: Callable[[int], int] | None = None,
) -> TilePlan:
    """Lay the tile grid for ``chain`` on an image of ``spec``, tiles ``tile_size`` pixels wide.

    ``output_tile_rule`` adjusts the output tile to what the result's format needs (a TIFF
    result's blocks must be whole TIFF tiles).
    """
    if not isinstance(tile_size, int) or not MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE:
        raise InvalidTileSize(
            f"tile_size must be a whole number from {MIN_TILE_SIZE} to {MAX_TILE_SIZE} pixels, "
            f"got {tile_size!r}"
        )
    spec.check()
    layout = check_chain(chain, spec)
    out_w, out_h = stage_sizes(chain, spec.width, spec.height)[-1]
    # A chain that shrinks the image gets smaller output tiles, so a tile still reads about
    # tile_size x tile_size source pixels, which is what bounds a worker's memory.
    scale = min(1.0, math.sqrt(out_w * out_h / spec.pixels))
    output_tile = max(MIN_OUTPUT_TILE, round(tile_size * scale))
    if output_tile_rule is not None:
        output_tile = output_tile_rule(output_tile)
    return TilePlan(
        spec=spec,
        chain=chain,
        tile_size=tile_size,
        output_tile=output_tile,
        output_width=out_w,
        output_height=out_h,
        rows=math.ceil(out_h / output_tile),
        columns=math.ceil(out_w / output_tile),
        output=layout,
    )


WORKER_RUNTIME_MB = 160
"""A tile worker's memory before its first tile: Python, boto3, pyvips (133 MB measured)."""

WORKER_BLOCK_COPIES = 8
"""A worker's peak above its runtime, in source blocks (7.5 measured at 2048 px, uchar RGB).

The block itself, libvips' intermediates of the chain, the output tile and its encoding.
"""

SAMPLE_BYTES = {
    "uchar": 1, "char": 1, "ushort": 2, "short": 2, "uint": 4, "int": 4, "float": 4, "double": 8,
}  # fmt: skip
"""Bytes of one sample of each libvips pixel format."""


def check_worker_memory(plan: TilePlan, memory_mb: int) -> None:
    """Raise `TileTooLarge` when a tile's source block would outgrow a worker of ``memory_mb``."""
    spec = plan.spec
    pixel_bytes = spec.bands * SAMPLE_BYTES[spec.format]
    # An interior tile: it has the halo on every side.
    row, column = min(1, plan.rows - 1), min(1, plan.columns - 1)
    block = plan.tile(row * plan.columns + column).source
    budget = (memory_mb - WORKER_RUNTIME_MB) * 2**20 / WORKER_BLOCK_COPIES
    if block.w * block.h * pixel_bytes <= budget:
        return
    largest = int(math.sqrt(max(0.0, budget) / pixel_bytes)) - (block.w - plan.tile_size)
    advice = (
        f"use tile_size {largest} or less"
        if largest >= MIN_TILE_SIZE
        else "no tile size fits: give the tile worker more memory"
    )
    raise TileTooLarge(
        f"tile_size {plan.tile_size} gives each tile worker a {block.w}x{block.h} block of "
        f"{spec.bands}-band {spec.format} pixels ({block.w * block.h * pixel_bytes / 2**20:,.0f} "
        f"MiB), more than a {memory_mb:,} MB worker can process; {advice}"
    )

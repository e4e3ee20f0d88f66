"""The levels no worker's block holds whole, reduced group by group in bounded memory.

Each block hands over its next halving raw: a "piece", at most half a tile on a side, at the
first level no block holds whole. The merger reads that level a group at a time, a square of
pieces of at most `GROUP_BYTES` raw bytes (grown by the halo a tile set's overlap needs), and
gives each group to the batch writer the workers use, placed at that level (`Blocks`): the
writer encodes the levels the group holds whole and hands over the group's own next halving
as a piece. Each round is a level several halvings coarser than the last; the rounds end
with the pyramid. The merger holds one group's pixels whatever the size of the image, and
the groups' encoded tiles go to objects, as a batch's do, which the assembly copies or reads.

The first round's pixels grow with the image (1/4^m of them, for blocks of m levels): when
that level is wider or taller than one `FANOUT_SIDE` group, its groups are the state
machine's second fan-out (`reduction_fanout`), each a tile worker's task, and the merger
starts from their pieces, a level several halvings coarser: what it reduces itself stays
within about one such group however large the image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tilefan.errors import TilefanError
from tilefan.formats.tiff_tiles import from_array, numpy_dtype
from tilefan.imaging.geometry import Rect
from tilefan.imaging.plan import Tile
from tilefan.state.storage import ObjectMissing, keys

if TYPE_CHECKING:
    from pyvips import Image

    from tilefan.state.storage import TileStore

__all__ = [
    "FANOUT_SIDE",
    "GROUP_BYTES",
    "Blocks",
    "GroupWriter",
    "Piece",
    "PixelLayout",
    "Reduction",
    "coarse_levels",
    "fanned_out",
    "reduce_group",
    "reduce_levels",
]

GROUP_BYTES = 64 * 2**20
"""Raw bytes of one group at most (its halo aside): 4096 px squares of 8-bit RGB, 2048 of
float RGB. The merger holds a group's pixels about three times (the pieces read, the mosaic,
its encoded levels), well inside its memory whatever the image's size."""

FANOUT_SIDE = 1024
"""A second-fan-out group's side at most, px at its level (whole tiles times a power of two):
1 MP, which a tile worker reduces in well under a second, and of which the merger keeps
1/64 or less for its own rounds."""

_IO_THREADS = 16


@dataclass(frozen=True)
class Blocks:
    """Where a batch writer's blocks lie: ``side`` px squares at pyramid ``level``,
    ``columns`` across, numbered row by row (a worker's: level 0, the grid's output tiles)."""

    level: int
    side: int
    columns: int

    def core(self, number: int, width: int, height: int) -> Rect:
        """Block ``number``'s square, clipped to its level (``width`` x ``height``)."""
        row, column = divmod(number, self.columns)
        square = Rect(column * self.side, row * self.side, self.side, self.side)
        return square.clip(width, height)


@dataclass(frozen=True)
class Piece:
    """A block's next halving, stored raw: where it lies at its level and in which object."""

    level: int
    x: int
    y: int
    width: int
    height: int
    key: str
    offset: int

    @classmethod
    def listed(cls, index: Mapping[str, Any]) -> list[Piece]:
        """The pieces a batch's or group's index lists (none when it was the pyramid's end)."""
        return [
            cls(index["pieces_level"], x, y, w, h, index["pieces_key"], offset)
            for x, y, w, h, offset in index.get("pieces", ())
        ]


@dataclass(frozen=True)
class PixelLayout:
    """The pieces' pixels: bands, libvips format and interpretation."""

    bands: int
    format: str
    interpretation: str

    @property
    def pixel_bytes(self) -> int:
        """Bytes of one pixel."""
        return self.bands * int(np.dtype(numpy_dtype(self.format)).itemsize)


class GroupWriter(Protocol):
    """A batch writer placed at a coarse level: what `reduce_levels` asks of it."""

    @property
    def margin(self) -> int:
        """Pixels around a block its tiles reach into (a tile set's overlap)."""

    def add(self, tile: Tile, block: Image) -> None:
        """Encode ``block`` (``tile.output``, the block grown by the margin)."""

    def finish(self) -> dict[str, Any]:
        """Write the objects and the index; returns the index."""


@dataclass(frozen=True)
class Reduction:
    """One pyramid completed from pieces: a TIFF's, a tile set's or a preview's."""

    part: str
    """The name of its batches' and groups' index objects (`keys.encoded`)."""
    sizes: Sequence[tuple[int, int]]
    """Every level's size, full resolution first."""
    tile_size: int
    level: int
    """The pieces' level: the first no worker's block holds whole."""
    writer: Callable[[Blocks, int], GroupWriter]
    """The writer of group ``number`` of a round at ``blocks``."""
    pixels: Callable[[Mapping[str, Any]], PixelLayout]
    """The pieces' pixels, as a batch's or group's index records them."""

    @property
    def has_pieces(self) -> bool:
        """Whether the workers' blocks leave levels to reduce."""
        return self.level < len(self.sizes)

    def fanout(self) -> Blocks | None:
        """The groups of the first round when it is the second fan-out's: squares of at
        most `FANOUT_SIDE` at the pieces' level, when that level is larger than one; None
        when the merger reduces it itself."""
        if not self.has_pieces:
            return None
        width, height = self.sizes[self.level]
        side = self.tile_size
        while 2 * side <= FANOUT_SIDE:
            side *= 2
        if max(width, height) <= side:
            return None
        return Blocks(self.level, side, -(-width // side))

    def group_count(self, blocks: Blocks) -> int:
        """Groups of ``blocks`` over their level."""
        return blocks.columns * -(-self.sizes[blocks.level][1] // blocks.side)

    def group_rect(self, blocks: Blocks, number: int, margin: int) -> Rect:
        """The pixels group ``number`` reads at its level: its square grown by the
        ``margin`` its writer's tiles reach into, clipped to the level."""
        width, height = self.sizes[blocks.level]
        grown = blocks.core(number, width, height).grow(margin, margin, margin, margin)
        return grown.clip(width, height)

    def batches_under(self, blocks: Blocks, number: int, grid: Mapping[str, Any]) -> list[int]:
        """The worker blocks (tile indexes of the job's ``grid``) whose pieces group
        ``number`` reads."""
        rect = self.group_rect(blocks, number, self.writer(blocks, number).margin)
        scale, side = 2**blocks.level, grid["output_tile"]
        columns = range(rect.x * scale // side, -(-rect.right * scale // side))
        rows = range(rect.y * scale // side, -(-rect.bottom * scale // side))
        return [
            row * grid["columns"] + column
            for row in rows
            if row < grid["rows"]
            for column in columns
            if column < grid["columns"]
        ]


def fanned_out(store: TileStore, job_id: str, reduction: Reduction) -> list[dict[str, Any]]:
    """The indexes of the first round's groups when the second fan-out reduced them (the
    merger starts from their pieces); none when the merger reduces that round itself."""
    blocks = reduction.fanout()
    if blocks is None:
        return []
    names = [
        keys.encoded(job_id, number, reduction.part, blocks.level)
        for number in range(reduction.group_count(blocks))
    ]
    try:
        return store.get_json_all(names)
    except ObjectMissing as e:
        raise TilefanError(f"a group of level {blocks.level} was never reduced: {e}") from e


def coarse_levels(
    store: TileStore,
    job_id: str,
    reduction: Reduction,
    indexes: Sequence[Mapping[str, Any]],
    pixels: PixelLayout,
) -> list[dict[str, Any]]:
    """Every level no batch holds whole: the second fan-out's groups (when it reduced the
    first round), then the merger's own, from their pieces or the batches'; their indexes."""
    groups = fanned_out(store, job_id, reduction)
    pieces = [piece for index in (groups or indexes) for piece in Piece.listed(index)]
    return groups + reduce_levels(store, pieces, reduction, pixels)


def reduce_group(
    store: TileStore,
    pieces: Sequence[Piece],
    reduction: Reduction,
    blocks: Blocks,
    number: int,
    pixels: PixelLayout,
) -> dict[str, Any]:
    """Group ``number`` of ``blocks`` (a task of the second fan-out), read from ``pieces``
    and written by its writer; returns its index."""
    cells = _Cells(pieces, reduction.tile_size // 2)
    return _reduce(store, cells, reduction, blocks, number, pixels)


def reduce_levels(
    store: TileStore,
    pieces: Sequence[Piece],
    reduction: Reduction,
    pixels: PixelLayout,
) -> list[dict[str, Any]]:
    """Every level below the pieces', group by group; returns the groups' indexes."""
    indexes: list[dict[str, Any]] = []
    sizes, tile_size = reduction.sizes, reduction.tile_size
    while pieces:
        level = pieces[0].level
        width, height = sizes[level]
        side = _group_side(tile_size, len(sizes) - level, width, height, pixels.pixel_bytes)
        blocks = Blocks(level, side, -(-width // side))
        cells = _Cells(pieces, tile_size // 2)
        coarser: list[Piece] = []
        for number in range(reduction.group_count(blocks)):
            index = _reduce(store, cells, reduction, blocks, number, pixels)
            indexes.append(index)
            coarser += Piece.listed(index)
        pieces = coarser
    return indexes


def _reduce(
    store: TileStore,
    cells: _Cells,
    reduction: Reduction,
    blocks: Blocks,
    number: int,
    pixels: PixelLayout,
) -> dict[str, Any]:
    group = reduction.writer(blocks, number)
    rect = reduction.group_rect(blocks, number, group.margin)
    group.add(Tile(number, rect, rect), cells.read(store, rect, pixels))
    return group.finish()


def _group_side(tile_size: int, levels: int, width: int, height: int, pixel_bytes: int) -> int:
    """Whole tiles times a power of two: the largest square within `GROUP_BYTES` (at least
    one tile), or when the whole level fits, a square that holds all ``levels`` left (a
    level smaller than a tile is one tile), so one group ends the pyramid."""
    side = tile_size
    while side < max(width, height) and (2 * side) ** 2 * pixel_bytes <= GROUP_BYTES:
        side *= 2
    if side >= max(width, height):
        return max(side, tile_size << (levels - 1))
    return side


class _Cells:
    """A round's pieces by the half-tile cell each starts in (pieces never span two)."""

    def __init__(self, pieces: Sequence[Piece], cell: int) -> None:
        self.cell = cell
        self.pieces = {(piece.x // cell, piece.y // cell): piece for piece in pieces}

    def read(self, store: TileStore, rect: Rect, pixels: PixelLayout) -> Image:
        """The level's pixels in ``rect``, from the pieces under it."""
        cell = self.cell
        wanted = [
            self.pieces[column, row]
            for row in range(rect.y // cell, -(-rect.bottom // cell))
            for column in range(rect.x // cell, -(-rect.right // cell))
            if (column, row) in self.pieces
        ]
        dtype = numpy_dtype(pixels.format)
        mosaic = np.zeros((rect.h, rect.w, pixels.bands), dtype=dtype)
        covered = 0
        for piece, raw in _fetched(store, wanted, pixels.pixel_bytes):
            part = Rect(piece.x, piece.y, piece.width, piece.height)
            part = Rect(part.x - rect.x, part.y - rect.y, part.w, part.h).clip(rect.w, rect.h)
            left, top = part.x + rect.x - piece.x, part.y + rect.y - piece.y
            block = np.frombuffer(raw, dtype=dtype).reshape(piece.height, piece.width, -1)
            mosaic[part.y : part.bottom, part.x : part.right] = block[
                top : top + part.h, left : left + part.w
            ]
            covered += part.w * part.h
        if covered != rect.w * rect.h:
            raise TilefanError(
                f"the pieces cover {covered} of the {rect.w * rect.h} pixels of {rect}"
                f" at level {wanted[0].level if wanted else '?'}: a batch's pieces are missing"
            )
        return from_array(mosaic, pixels.format, pixels.interpretation)


def _fetched(
    store: TileStore, pieces: Sequence[Piece], pixel_bytes: int
) -> Iterator[tuple[Piece, memoryview]]:
    """Each piece's bytes, read in one request per run of pieces stored end to end."""
    runs: list[list[Piece]] = []
    for piece in sorted(pieces, key=lambda piece: (piece.key, piece.offset)):
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and last.key == piece.key
            and last.offset + last.width * last.height * pixel_bytes == piece.offset
        ):
            runs[-1].append(piece)
        else:
            runs.append([piece])

    def read(run: list[Piece]) -> bytes:
        end = run[-1].offset + run[-1].width * run[-1].height * pixel_bytes
        return store.get_range(run[0].key, run[0].offset, end - run[0].offset)

    with ThreadPoolExecutor(_IO_THREADS) as pool:
        for run, raw in zip(runs, pool.map(read, runs), strict=True):
            view = memoryview(raw)
            for piece in run:
                start = piece.offset - run[0].offset
                yield piece, view[start : start + piece.width * piece.height * pixel_bytes]

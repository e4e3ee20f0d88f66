"""The levels no worker's block holds whole, reduced group by group in bounded memory.

Each block hands over its next halving raw: a "piece", at most half a tile on a side, at the
first level no block holds whole. The merger reads that level a group at a time, a square of
pieces of at most `GROUP_BYTES` raw bytes (grown by the halo a tile set's overlap needs), and
gives each group to the batch writer the workers use, placed at that level (`Blocks`): the
writer encodes the levels the group holds whole and hands over the group's own next halving
as a piece. Each round is a level several halvings coarser than the last; the rounds end
with the pyramid. The merger holds one group's pixels whatever the size of the image, and
the groups' encoded tiles go to objects, as a batch's do, which the assembly copies or reads.
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

if TYPE_CHECKING:
    from pyvips import Image

    from tilefan.state.storage import TileStore

__all__ = ["GROUP_BYTES", "Blocks", "GroupWriter", "Piece", "PixelLayout", "reduce_levels"]

GROUP_BYTES = 64 * 2**20
"""Raw bytes of one group at most (its halo aside): 4096 px squares of 8-bit RGB, 2048 of
float RGB. The merger holds a group's pixels about three times (the pieces read, the mosaic,
its encoded levels), well inside its memory whatever the image's size."""

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


def reduce_levels(
    store: TileStore,
    pieces: Sequence[Piece],
    sizes: Sequence[tuple[int, int]],
    tile_size: int,
    pixels: PixelLayout,
    writer: Callable[[Blocks, int], GroupWriter],
) -> list[dict[str, Any]]:
    """Every level below the pieces', group by group; returns the groups' indexes.

    ``writer(blocks, number)`` is the writer of group ``number`` of a round; ``tile_size``
    is the result's tile, ``sizes`` every level's size, full resolution first.
    """
    indexes: list[dict[str, Any]] = []
    while pieces:
        level = pieces[0].level
        width, height = sizes[level]
        side = _group_side(tile_size, len(sizes) - level, width, height, pixels.pixel_bytes)
        blocks = Blocks(level, side, -(-width // side))
        cells = _Cells(pieces, tile_size // 2)
        coarser: list[Piece] = []
        for number in range(blocks.columns * -(-height // side)):
            group = writer(blocks, number)
            margin = group.margin
            grown = blocks.core(number, width, height).grow(margin, margin, margin, margin)
            grown = grown.clip(width, height)
            group.add(Tile(number, grown, grown), cells.read(store, grown, pixels))
            index = group.finish()
            indexes.append(index)
            coarser += Piece.listed(index)
        pieces = coarser
    return indexes


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

"""DeepZoom and IIIF results: workers write their blocks' tiles, the merger the coarse levels.

A worker's block is ``tile_size * 2**m`` pixels on a side and starts on the tile grid, so it
holds whole tiles of the set at full resolution and at each of its first ``m`` halvings
(`worker_levels`). Overlap makes a tile reach into its neighbours: ``overlap`` pixels at
level ``k`` come from ``overlap * 2**k`` pixels at full resolution, so the worker computes
its block grown by ``overlap * 2**m`` on each side (`TileSetBatchWriter.expand`, clipped to
the image), halves it level by level with ``dzsave``'s arithmetic and cuts its tiles, overlap
and all. A tile set's tiles go straight to their final keys under the result's prefix (a
retried batch writes the same bytes again); a zip's go into one object per batch as stored
entries. Each block also keeps its next halving raw ("pieces"): the merger reduces those
group by group with the same writer (`reduction`), grown by the same margin, down to the last
level, then writes the ``.dzi`` or ``info.json``, which says the set is complete, or for a
zip the central directory around server-side copies of the workers' and groups' objects.
It decodes no tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tilefan.errors import TilefanError
from tilefan.formats.dz_tiles import TileSetLayout, halve_padded
from tilefan.formats.outputs import STREAMED_FORMATS
from tilefan.formats.tiff_tiles import TIFF_TILE, power_of_two_block
from tilefan.formats.zip_layout import ZipEntry, central_directory, local_entry
from tilefan.imaging.geometry import Rect
from tilefan.imaging.plan import ImageSpec, Tile, TilePlan, stage_regions, stage_sizes
from tilefan.stages.reduction import (
    Blocks,
    PixelLayout,
    Reduction,
    coarse_levels,
)
from tilefan.state.multipart import Range, assemble_object
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyvips import Image

    from tilefan.imaging.operations import Chain
    from tilefan.stages.pipeline import Pipeline
    from tilefan.state.jobs import Job
    from tilefan.state.storage import TileStore

__all__ = [
    "PREVIEW_LAYOUT",
    "SET_NAME",
    "TileSetBatchWriter",
    "assemble_preview",
    "assemble_tileset",
    "set_reduction",
    "tileset_output_tile",
    "tileset_paths",
    "wants_preview",
    "worker_levels",
]

SET_NAME = "result"
"""The set's name: ``result.dzi`` and ``result_files/``, the IIIF folder ``result/``."""

_IO_THREADS = 16

PREVIEW_LAYOUT = TileSetLayout(tile_size=TIFF_TILE, overlap=0, suffix="jpeg")
"""A result's DeepZoom preview: blocks of ``TIFF_TILE * 2**m`` pixels are whole tiles of it."""

_PREVIEW_FORMATS = frozenset({"tiff", *STREAMED_FORMATS})
"""Results shown through a preview: a TIFF, which browsers cannot draw, and the streamed
formats, which they draw only whole (a tile set is its own preview)."""

_PREVIEW_FOLDER = "preview/"
"""Where the preview lies under the result's prefix: ``preview/result.dzi`` and its tiles."""

_PREVIEW_PART = "preview-"
"""Before the preview's encoded parts (``preview-index``), apart from a TIFF's own."""


def wants_preview(output_format: str, options: Mapping[str, Any]) -> bool:
    """Whether the workers write a preview set beside the result: on unless turned off."""
    return output_format in _PREVIEW_FORMATS and bool(options.get("preview", True))


def tileset_output_tile(output_format: str, options: Mapping[str, Any]) -> Callable[[int], int]:
    """The output tile of a tile set: its tile size times the nearest power of two."""
    tile_size = TileSetLayout.from_options(output_format, options).tile_size
    return lambda planned: power_of_two_block(planned, tile_size)


def worker_levels(output_tile: int, tile_size: int, level_count: int) -> int:
    """How many levels workers write: those where a block is still whole tiles."""
    return min(level_count, int(math.log2(output_tile // tile_size)) + 1)


def tileset_paths(output_format: str) -> tuple[str, str]:
    """Where a set's tiles and its descriptor lie, within its prefix or zip."""
    if output_format == "iiif":
        return f"{SET_NAME}/", f"{SET_NAME}/info.json"
    return f"{SET_NAME}_files/", f"{SET_NAME}.dzi"


class TileSetBatchWriter:
    """Writes one manifest item's tiles at every level its blocks hold whole, keeps pieces.

    A worker's batch (its ``chain`` and source ``spec`` say what each block reads); with
    ``blocks``, the merger's groups of a coarse level.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        job: Job,
        first_tile: int,
        chain: Chain | None,
        spec: ImageSpec | None,
        *,
        preview: bool = False,
        blocks: Blocks | None = None,
    ) -> None:
        """The writer of the job's tile set, or with ``preview`` of its result's preview."""
        grid = job.grid or {}
        self.pipeline = pipeline
        self.job_id = job.job_id
        self.first_tile = first_tile
        self.preview = preview
        if preview:
            self.layout = PREVIEW_LAYOUT
            self.tiles_root = _PREVIEW_FOLDER + tileset_paths("dzi")[0]
        else:
            self.layout = TileSetLayout.from_options(job.output_format, job.output_options)
            self.tiles_root = tileset_paths(job.output_format)[0]
        self.part = _PREVIEW_PART if preview else ""
        self.zipped = job.output_format == "dz"
        self.sizes = self.layout.level_sizes(grid["output_width"], grid["output_height"])
        self.blocks = blocks or Blocks(0, grid["output_tile"], grid["columns"])
        self.width, self.height = self.sizes[self.blocks.level]
        self.levels = worker_levels(
            self.blocks.side, self.layout.tile_size, len(self.sizes) - self.blocks.level
        )
        self.chain = chain
        # What each stage of a worker's chain makes: the source rectangles `expand` reads.
        self.stage_sizes = (
            stage_sizes(chain, spec.width, spec.height)
            if chain is not None and spec is not None
            else []
        )
        self.entries: list[list[Any]] = []
        self.entry_data = bytearray()
        self.pieces: list[list[int]] = []
        self.piece_data = bytearray()
        self.pixels: dict[str, Any] = {}
        self.block_count = 0
        self.tiles = 0
        self.tile_bytes = 0

    @property
    def margin(self) -> int:
        """Pixels around a block its tiles reach into: the overlap its coarsest level needs."""
        return self.layout.overlap << (self.levels - 1)

    def expand(self, tile: Tile) -> Tile:
        """A worker's tile grown by the `margin`, with that rectangle's source."""
        assert self.chain is not None and self.stage_sizes, "a worker's writer"
        margin = self.margin
        out = tile.output.grow(margin, margin, margin, margin).clip(self.width, self.height)
        return Tile(tile.index, stage_regions(self.chain, self.stage_sizes, out)[0], out)

    def add(self, tile: Tile, block: Image) -> None:
        """Cut and write the tiles of ``block`` (an `expand`-ed tile's result) at each level."""
        core = self.blocks.core(tile.index, self.width, self.height)
        if self.preview and block.format != "uchar":
            return  # JPEG tiles need 8-bit pixels: a preview of other results is not made
        # Cut into many tiles and halved: computed once, not once per tile (a coarse level's
        # group is in memory already, and saveable as it is).
        image = self.layout.saveable(block)
        if self.blocks.level == 0:
            image = image.copy_memory()
        tiles: list[tuple[str, bytes]] = []
        self.block_count += 1
        base = self.blocks.level
        self.pixels = {
            "bands": block.bands,
            "format": block.format,
            # What the pyramid is made of: JPEG tiles flatten an alpha channel first.
            "saved": [image.bands, image.format, image.interpretation],
        }
        for level in range(self.levels):
            scale = 2**level
            origin_x, origin_y = tile.output.x // scale, tile.output.y // scale
            width, height = self.sizes[base + level]
            for tile_column, tile_row, rect in self.layout.tiles(
                width, height, _scaled(core, scale)
            ):
                data = self.layout.encode(
                    image.crop(rect.x - origin_x, rect.y - origin_y, rect.w, rect.h)
                )
                name = self.layout.tile_name(self.sizes, base + level, tile_column, tile_row)
                tiles.append((self.tiles_root + name, data))
            if level + 1 < self.levels:
                image = halve_padded(image)
        self._write(tiles)
        if len(self.sizes) > base + self.levels:
            scale = 2 ** (self.levels - 1)
            last = _scaled(core, scale)
            piece = halve_padded(
                image.crop(
                    last.x - tile.output.x // scale, last.y - tile.output.y // scale, last.w, last.h
                )
            )
            self.pieces.append(
                [last.x // 2, last.y // 2, piece.width, piece.height, len(self.piece_data)]
            )
            self.piece_data += piece.write_to_memory()

    def _write(self, tiles: list[tuple[str, bytes]]) -> None:
        """A block's tiles: zip entries of the batch's object, or objects written now (so
        none is still uploading when the batch ends, even by an error)."""
        self.tiles += len(tiles)
        self.tile_bytes += sum(len(data) for _, data in tiles)
        if self.zipped:
            for name, data in tiles:
                entry, crc = local_entry(name, data)
                self.entries.append([name, crc, len(data), len(self.entry_data)])
                self.entry_data += entry
            return
        prefix, store = keys.result_prefix(self.job_id), self.pipeline.store
        content_type = self.layout.content_type
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            list(
                pool.map(
                    lambda tile: store.put_bytes(prefix + tile[0], tile[1], content_type), tiles
                )
            )

    def finish(self) -> dict[str, Any]:
        """Write the batch's entries and pieces, then its index (last: it says all is there);
        returns the index (empty for a preview not made)."""
        store, job_id, first = self.pipeline.store, self.job_id, self.first_tile
        base = self.blocks.level
        if not self.block_count:
            return {}  # a preview not made
        index: dict[str, Any] = {
            "blocks": self.block_count,
            "tiles": self.tiles,
            "tile_bytes": self.tile_bytes,
            **self.pixels,
        }
        if self.zipped:
            index["entries_key"] = keys.encoded(job_id, first, "tiles", base)
            index["entries"] = self.entries
            index["entries_bytes"] = len(self.entry_data)
            store.put_bytes(index["entries_key"], bytes(self.entry_data))
        if self.pieces:
            index["pieces_key"] = keys.encoded(job_id, first, self.part + "pieces", base)
            index["pieces_level"] = base + self.levels
            index["pieces"] = self.pieces
            index["pieces_bytes"] = len(self.piece_data)
            store.put_bytes(index["pieces_key"], bytes(self.piece_data))
        store.put_json(keys.encoded(job_id, first, self.part + "index", base), index)
        return index


def _scaled(core: Rect, scale: int) -> Rect:
    """A full-resolution rectangle at a level ``scale`` times smaller, sizes rounded up."""
    x, y = core.x // scale, core.y // scale
    return Rect(x, y, -(-core.right // scale) - x, -(-core.bottom // scale) - y)


def assemble_tileset(pipeline: Pipeline, job: Job, plan: TilePlan) -> dict[str, Any]:
    """Write the coarse levels and the descriptor (a zip: around the workers' entries)."""
    store = pipeline.store
    layout = TileSetLayout.from_options(job.output_format, job.output_options)
    indexes = _indexes(pipeline, job, plan, "index")
    indexes += _reduced(pipeline, job, indexes, preview=False)
    width, height = plan.output_width, plan.output_height
    tiles_root, descriptor_path = tileset_paths(job.output_format)
    descriptor = layout.descriptor(width, height, SET_NAME)
    record = {
        "format": job.output_format,
        "width": width,
        "height": height,
        "bands": indexes[0]["bands"],
        "pixel_format": indexes[0]["format"],
        "tiles": sum(index["tiles"] for index in indexes),
    }
    if job.output_format == "dz":
        key = keys.result(job.job_id, "zip")
        size = assemble_object(
            store, key, _zip_pieces(indexes, descriptor_path, descriptor), "application/zip"
        )
        return {"key": key, "size_bytes": size, **record}
    prefix = keys.result_prefix(job.job_id)
    key = _write_descriptor(store, layout, prefix + descriptor_path, descriptor)
    size = sum(index["tile_bytes"] for index in indexes) + len(descriptor)
    return {"key": key, "prefix": prefix + tiles_root, "size_bytes": size, **record}


def assemble_preview(pipeline: Pipeline, job: Job, plan: TilePlan) -> dict[str, Any] | None:
    """A result's preview: its coarse levels and ``.dzi``; None when none was made."""
    indexes = _indexes(pipeline, job, plan, _PREVIEW_PART + "index")
    if not indexes:
        return None
    _reduced(pipeline, job, indexes, preview=True)
    tiles_root, descriptor_path = tileset_paths("dzi")
    descriptor = PREVIEW_LAYOUT.descriptor(plan.output_width, plan.output_height, SET_NAME)
    prefix = keys.result_prefix(job.job_id) + _PREVIEW_FOLDER
    key = _write_descriptor(pipeline.store, PREVIEW_LAYOUT, prefix + descriptor_path, descriptor)
    return {"key": key, "prefix": prefix + tiles_root}


def set_reduction(pipeline: Pipeline, job: Job, *, preview: bool) -> Reduction:
    """The levels of the job's tile set, or with ``preview`` of its result's preview, that
    no worker's block holds whole."""
    grid = job.grid or {}
    layout = (
        PREVIEW_LAYOUT
        if preview
        else TileSetLayout.from_options(job.output_format, job.output_options)
    )
    sizes = layout.level_sizes(grid["output_width"], grid["output_height"])

    def group_writer(blocks: Blocks, number: int) -> TileSetBatchWriter:
        return TileSetBatchWriter(pipeline, job, number, None, None, preview=preview, blocks=blocks)

    level = worker_levels(grid["output_tile"], layout.tile_size, len(sizes))
    part = (_PREVIEW_PART if preview else "") + "index"
    return Reduction(
        part,
        sizes,
        layout.tile_size,
        level,
        group_writer,
        lambda index: PixelLayout(*index["saved"]),
    )


def _reduced(
    pipeline: Pipeline,
    job: Job,
    indexes: Sequence[Mapping[str, Any]],
    *,
    preview: bool,
) -> list[dict[str, Any]]:
    """The levels no block holds whole, written group by group; the groups' indexes (the
    second fan-out's first, when it reduced the first round)."""
    reduction = set_reduction(pipeline, job, preview=preview)
    pixels = reduction.pixels(indexes[0])
    return coarse_levels(pipeline.store, job.job_id, reduction, indexes, pixels)


def _indexes(pipeline: Pipeline, job: Job, plan: TilePlan, part: str) -> list[Any]:
    """The workers' indexes of one set (none, or one per batch covering every block)."""
    store = pipeline.store
    index_keys = sorted(
        key for key in store.list_keys(keys.encoded_prefix(job.job_id)) if key.endswith("." + part)
    )
    indexes = store.get_json_all(index_keys)
    blocks = sum(index["blocks"] for index in indexes)
    if indexes and blocks != plan.tile_count:
        raise TilefanError(f"the workers wrote {blocks} of the {plan.tile_count} blocks")
    return indexes


def _write_descriptor(store: TileStore, layout: TileSetLayout, key: str, descriptor: bytes) -> str:
    """Write the descriptor, after every tile: it says the set is complete."""
    store.put_bytes(key, descriptor, "application/json" if layout.iiif else "application/xml")
    return key


def _zip_pieces(
    indexes: Sequence[Mapping[str, Any]], descriptor_path: str, descriptor: bytes
) -> Iterator[bytes | Range]:
    """The zip: the workers' and groups' entries copied, the descriptor, the directory."""
    entries: list[ZipEntry] = []
    offset = 0
    for index in indexes:
        for name, crc, size, start in index["entries"]:
            entries.append(ZipEntry(name, crc, size, offset + start))
        if index["entries_bytes"]:
            yield Range(index["entries_key"], 0, index["entries_bytes"])
        offset += index["entries_bytes"]
    entry, crc = local_entry(descriptor_path, descriptor)
    entries.append(ZipEntry(descriptor_path, crc, len(descriptor), offset))
    yield entry
    yield central_directory(entries, offset + len(entry))

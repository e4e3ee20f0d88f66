"""TIFF results: workers encode their blocks; the merger writes header and IFDs around them.

A worker's block is ``TIFF_TILE * 2**m`` pixels on a side and starts on the tile grid, so it
is whole TIFF tiles at full resolution and at each of its first ``m`` halvings. The worker
encodes all of those levels (``encode_block``) into one object per manifest item, and writes
an index of where each tile lies in it. Levels coarser than a block's own (a TIFF tile then
spans several blocks) come from each block's next halving, stored raw ("pieces"), which the
merger reduces group by group with the same writer (`reduction`). Each worker copies its
levels of at least 5 MiB server-side into the result's multipart upload, which the splitter
opened (`prepare_assembly`), at part numbers reserved for them (`reserved_part`). The merger
decodes no tile: it lays out the header and the IFDs (``tiff_layout``) and completes the
upload around the workers' parts with its own: the head, the groups' objects and the small
ranges.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from tilefan.errors import TilefanError
from tilefan.formats.dz_tiles import TILESET_FORMATS
from tilefan.formats.tiff_layout import CLASSIC_LIMIT, Page, Tag, layout
from tilefan.formats.tiff_tiles import (
    TIFF_TILE,
    TiffEncoding,
    encode_block,
    halve,
    level_sizes,
    tiff_output_tile,
    without_metadata,
)
from tilefan.imaging.plan import SAMPLE_BYTES, Tile, TilePlan
from tilefan.stages.reduction import (
    Blocks,
    PixelLayout,
    Reduction,
    coarse_levels,
)
from tilefan.stages.tileset_output import TileSetBatchWriter, tileset_output_tile, wants_preview
from tilefan.state._transport import AWS_ERRORS
from tilefan.state.multipart import (
    MAX_PARTS,
    MIN_PART,
    Range,
    assemble_object,
    copy_part,
    open_upload,
    put_joined,
)
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyvips import Image

    from tilefan.stages.pipeline import Pipeline
    from tilefan.state.jobs import Job

__all__ = [
    "TiffBatchWriter",
    "assemble_tiff",
    "expected_batch_bytes",
    "level_length",
    "output_tile_rule",
    "pack_tiles",
    "prepare_assembly",
    "reserved_part",
    "table_bytes",
    "tiff_reduction",
    "tiles_per_item",
    "unpack_tiles",
    "worker_levels",
]

BIGTIFF_ABOVE = CLASSIC_LIMIT
"""A result larger than this is written as BigTIFF (tests lower it to force BigTIFF)."""

_EXPECTED_RATIO = {"none": 1.0, "lzw": 0.5, "deflate": 0.4, "jpeg": 0.1}
"""Encoded over raw bytes, on the small side of what DESIGN-NOTES measured for deflate
(0.13-0.6 on 1024 px blocks), so most batches' objects pass S3's 5 MiB copy minimum."""

_MAX_BATCH_BYTES = 3 * 2**27
"""Raw output bytes of one manifest item at most, the default batch included: 2^27 pixels of
8-bit RGB (eight 4096 px tiles, 128 of 1024), two 4096 px tiles of float RGB. A worker holds
its batch's encoded levels until it writes its object, up to their raw size for data that
does not compress (a third more for a pyramid), beside the block it computes; at the model's
0.25 s per megapixel on Lambda such a batch ends in about half a minute."""

_MIN_ITEMS = 64
"""Batches grow past the default only while the job keeps this many manifest items, so a
small job still spreads over the workers."""

LOG = logging.getLogger(__name__)

_MIN_GAP = 64
"""Part numbers the merger needs at least before each level's reserved block for its own
parts (the head, the coarse levels, the ranges under 5 MiB): 512 MiB of 8 MiB parts."""

_COPIED_LEVELS = 3
"""A pyramid's batches aim for its first three levels to be copied: the levels below hold
1/48 of the result's bytes, which the merger gathers through itself."""


def output_tile_rule(output_format: str, options: Mapping[str, Any]) -> Callable[[int], int] | None:
    """How a format adjusts the planned output tile: whole TIFF tiles, or whole tiles of a set.

    A streamed result with a preview takes the TIFF rule too: its blocks are then whole
    preview tiles (`PREVIEW_LAYOUT`'s are TIFF tiles' size) at each level a block holds.
    """
    if output_format == "tiff" or wants_preview(output_format, options):
        return tiff_output_tile
    if output_format in TILESET_FORMATS:
        return tileset_output_tile(output_format, options)
    return None


def tiles_per_item(plan: TilePlan, options: Mapping[str, Any], default: int) -> int:
    """Tiles per manifest item for a TIFF result: enough for about two S3 minimum parts of
    each level that should be copied (level 0; a pyramid's first three), keeping at least
    `_MIN_ITEMS` items; never fewer than ``default``, and never more than `_MAX_BATCH_BYTES`
    of the result's raw pixels (at least one tile), whatever the default.

    A batch's share of a level is copied server-side when it passes 5 MiB (by its worker)
    and gathered through the merger otherwise: a COG's level 2 is 1/16 of a batch's level 0.
    """
    encoding = TiffEncoding.from_options(options)
    raw = plan.output_tile**2 * plan.output.bands * SAMPLE_BYTES[plan.output.format]
    expected = expected_batch_bytes(plan, options, 1)
    if encoding.pyramid:
        sizes = level_sizes(plan.output_width, plan.output_height, pyramid=True)
        expected /= 4 ** (min(worker_levels(plan.output_tile, sizes), _COPIED_LEVELS) - 1)
    most = max(1, _MAX_BATCH_BYTES // raw)
    spread = max(1, plan.tile_count // _MIN_ITEMS)
    return min(most, max(default, min(spread, math.ceil(2 * MIN_PART / expected))))


def expected_batch_bytes(plan: TilePlan, options: Mapping[str, Any], tiles: int) -> float:
    """What ``tiles`` output tiles are expected to take encoded, at full resolution."""
    raw = plan.output_tile**2 * plan.output.bands * SAMPLE_BYTES[plan.output.format]
    compression = TiffEncoding.from_options(options).compression
    return tiles * raw * _EXPECTED_RATIO.get(compression, 1.0)


def worker_levels(output_tile: int, sizes: Sequence[tuple[int, int]]) -> int:
    """How many levels workers encode: those where a block is still whole TIFF tiles."""
    return min(len(sizes), int(math.log2(output_tile // TIFF_TILE)) + 1)


def prepare_assembly(
    pipeline: Pipeline,
    job_id: str,
    plan: TilePlan,
    options: Mapping[str, Any],
    tiles_per_item: int,
) -> dict[str, Any] | None:
    """Open the TIFF result's multipart upload for the workers to copy their levels into;
    returns what they need to number their parts (`reserved_part`), or None when the
    numbers do not leave the merger room for its own parts (it then copies every range).

    The merger's copies, a request per batch and level, were what grew with the image in
    its work: made by the workers, they run in parallel and the merger checks them in one
    list of the upload's parts."""
    batches = -(-plan.tile_count // tiles_per_item)
    sizes = level_sizes(
        plan.output_width, plan.output_height, pyramid=TiffEncoding.from_options(options).pyramid
    )
    levels = worker_levels(plan.output_tile, sizes)
    gap = (MAX_PARTS - levels * batches) // levels
    if gap < _MIN_GAP:
        return None
    upload_id = open_upload(pipeline.store, keys.result(job_id, "tif"), "image/tiff")
    return {
        "upload_id": upload_id,
        "batches": batches,
        "tiles_per_item": tiles_per_item,
        "levels": levels,
        "gap": gap,
    }


def reserved_part(assembly: Mapping[str, Any], batch: int, level: int) -> int:
    """The part number of a batch's share of a level in the result's prepared upload.

    The file holds the levels coarsest first, so the blocks of numbers do too: each level
    the workers encode has one number per batch, after a gap of ``gap`` numbers for the
    merger's parts before it (the head and the coarse levels before the first block, a
    level's ranges under 5 MiB before its own)."""
    levels, batches, gap = (int(assembly[name]) for name in ("levels", "batches", "gap"))
    return (levels - level) * gap + (levels - 1 - level) * batches + batch + 1


TileTable = npt.NDArray[np.uint32]
"""A level's tiles in a batch's object, in the order their bytes follow each other: one row
of (column, row, byte count) per tile. An index stores it packed (`pack_tiles`): a 2 GP
result has 40,000 tiles, which as JSON lists the merger parsed and walked one by one."""


def pack_tiles(table: npt.ArrayLike) -> str:
    """A tile table as an index stores it: little-endian uint32 triples, base64."""
    packed = np.ascontiguousarray(np.asarray(table).reshape(-1, 3), dtype="<u4")
    return base64.b64encode(packed.tobytes()).decode()


def unpack_tiles(packed: str) -> TileTable:
    """The tile table an index stores (`pack_tiles`)."""
    return np.frombuffer(base64.b64decode(packed), dtype="<u4").reshape(-1, 3)


def table_bytes(table: TileTable) -> int:
    """Bytes of a tile table's tiles, end to end."""
    return int(table[:, 2].sum(dtype=np.uint64))


def level_length(level: Mapping[str, Any]) -> int:
    """Bytes of an index's level: its tiles end to end."""
    return table_bytes(unpack_tiles(level["tile_table"]))


@dataclass
class _Level:
    tiles: list[npt.NDArray[np.int64]] = field(default_factory=list)
    """Each block's rows of the level's tile table."""
    data: bytearray = field(default_factory=bytearray)


class TiffBatchWriter:
    """Collects one manifest item's encoded blocks, then writes its object and index.

    A worker's batch by default; the merger's groups of a coarse level with ``blocks``.
    """

    margin = 0
    """TIFF tiles do not overlap: a block needs no pixels around it."""

    def __init__(
        self,
        pipeline: Pipeline,
        job: Job,
        first_tile: int,
        preview: TileSetBatchWriter | None = None,
        *,
        blocks: Blocks | None = None,
    ) -> None:
        """``preview`` also writes each block's tiles of the result's DeepZoom preview."""
        grid = job.grid or {}
        self.preview = preview
        self.pipeline = pipeline
        self.job_id = job.job_id
        self.first_tile = first_tile
        self.assembly = grid.get("assembly")
        self.blocks = blocks or Blocks(0, grid["output_tile"], grid["columns"])
        self.encoding = TiffEncoding.from_options(job.output_options)
        self.sizes = level_sizes(
            grid["output_width"], grid["output_height"], pyramid=self.encoding.pyramid
        )
        base = self.blocks.level
        self.levels = [_Level() for _ in range(worker_levels(self.blocks.side, self.sizes[base:]))]
        self.pieces: list[list[int]] = []
        self.piece_data = bytearray()
        self.tags: list[Tag] | None = None
        self.layout: dict[str, Any] = {}

    def add(self, tile: Tile, block: Image) -> None:
        """Encode the block of ``tile`` at every level it is whole tiles; keep its next halving."""
        if (self.preview is not None or len(self.sizes) > 1) and self.blocks.level == 0:
            # Read more than once (the preview's tiles, the halvings): run the chain once. A
            # coarse level's group is in memory already.
            block = block.copy_memory()
        if self.preview is not None:
            self.preview.add(tile, block)
        x, y = tile.output.x, tile.output.y
        base = self.blocks.level
        first = tile.index == 0 and base == 0
        # Every index says what its pieces are: a group of the second fan-out reads a few.
        self.layout = {"bands": block.bands, "format": block.format}
        for number, level in enumerate(self.levels):
            encoded = encode_block(block, self.encoding, metadata=first)
            if first and number == 0:
                self.tags = encoded.tags
            across = -(-block.width // TIFF_TILE)
            position = np.arange(len(encoded.tiles))
            level.tiles.append(
                np.column_stack(
                    (
                        (x >> number) // TIFF_TILE + position % across,
                        (y >> number) // TIFF_TILE + position // across,
                        [len(data) for data in encoded.tiles],
                    )
                )
            )
            for data in encoded.tiles:
                level.data += data
            if base + number + 1 == len(self.sizes):
                return  # the result's last level: nothing is made from it
            if min(block.width, block.height) < 2:
                return  # an edge block a pixel thick: the next level drops it
            block = halve(block)
        if len(self.sizes) > base + len(self.levels):
            shift = len(self.levels)
            self.pieces.append(
                [x >> shift, y >> shift, block.width, block.height, len(self.piece_data)]
            )
            self.piece_data += block.write_to_memory()

    def finish(self) -> dict[str, Any]:
        """Write the tiles object, the pieces object and the index (last: it says all is
        there); returns the index."""
        store, job_id, first = self.pipeline.store, self.job_id, self.first_tile
        base = self.blocks.level
        if self.preview is not None:
            self.preview.finish()
        tiles_key = keys.encoded(job_id, first, "tiles", base)
        index: dict[str, Any] = {"tiles_key": tiles_key, "levels": [], **self.layout}
        start = 0
        lengths = [len(level.data) for level in self.levels]
        for number, (level, length) in enumerate(zip(self.levels, lengths, strict=True)):
            table = np.concatenate(level.tiles) if level.tiles else np.empty((0, 3))
            index["levels"].append(
                {"level": base + number, "start": start, "tile_table": pack_tiles(table)}
            )
            start += length

        def drained() -> Iterator[bytearray]:
            # Each level handed over and dropped here: freed once sent, not held to the end.
            for level in self.levels:
                data, level.data = level.data, bytearray()
                yield data

        put_joined(store, tiles_key, start, drained())
        if self.assembly is not None and base == 0:
            self._copy_levels(index, lengths, self.assembly)
        if self.pieces:
            index["pieces_key"] = keys.encoded(job_id, first, "pieces", base)
            index["pieces_level"] = base + len(self.levels)
            index["pieces"] = self.pieces
            index["pieces_bytes"] = len(self.piece_data)
            store.put_bytes(index["pieces_key"], bytes(self.piece_data))
        if self.tags is not None:
            index["tags"] = [
                [tag.code, tag.type, tag.count, base64.b64encode(tag.value).decode()]
                for tag in self.tags
            ]
        store.put_json(keys.encoded(job_id, first, "index", base), index)
        return index

    def _copy_levels(
        self, index: dict[str, Any], lengths: Sequence[int], assembly: Mapping[str, Any]
    ) -> None:
        """Copy each level of at least 5 MiB into the result's prepared upload, at the part
        number reserved for this batch and level, all at once (the copies are S3's work),
        and note each part in the index.

        A copy that fails is noted nowhere: the merger copies that range itself, so a
        throttled or refused copy costs time, never the result."""
        batch = self.first_tile // assembly["tiles_per_item"]
        result = keys.result(self.job_id, "tif")
        levels = [
            (level, length)
            for level, length in zip(index["levels"], lengths, strict=True)
            if level["level"] < assembly["levels"] and length >= MIN_PART
        ]

        def copy(level: dict[str, Any], length: int) -> None:
            number = reserved_part(assembly, batch, level["level"])
            piece = Range(index["tiles_key"], level["start"], length)
            try:
                etag = copy_part(self.pipeline.store, result, assembly["upload_id"], number, piece)
            except AWS_ERRORS as e:
                LOG.warning(
                    "level %d of the batch from tile %d was not copied into the result (%s); "
                    "the merger copies it",
                    level["level"],
                    self.first_tile,
                    e,
                )
                return
            level["part"] = [number, etag]

        if levels:
            with ThreadPoolExecutor(len(levels)) as pool:
                for copied in [pool.submit(copy, level, length) for level, length in levels]:
                    copied.result()


def tiff_reduction(pipeline: Pipeline, job: Job) -> Reduction:
    """The pyramid levels of a TIFF result that no worker's block holds whole."""
    grid = job.grid or {}
    encoding = TiffEncoding.from_options(job.output_options)
    sizes = level_sizes(grid["output_width"], grid["output_height"], pyramid=encoding.pyramid)

    def group_writer(blocks: Blocks, number: int) -> TiffBatchWriter:
        return TiffBatchWriter(pipeline, job, number, blocks=blocks)

    return Reduction(
        "index",
        sizes,
        TIFF_TILE,
        worker_levels(grid["output_tile"], sizes),
        group_writer,
        lambda index: PixelLayout(index["bands"], index["format"], grid["interpretation"]),
    )


def assemble_tiff(pipeline: Pipeline, job: Job, plan: TilePlan) -> dict[str, Any]:
    """Write the TIFF result around the workers' and the coarse groups' tiles; returns the
    job's output record."""
    store = pipeline.store
    listed = store.list_keys(keys.encoded_prefix(job.job_id))
    indexes = store.get_json_all(sorted(k for k in listed if k.endswith(".index")))
    # The batch groups whose small levels were joined (`compaction`).
    joined = store.get_json_all(sorted(k for k in listed if k.endswith(".compact")))
    first = next((index for index in indexes if "tags" in index), None)
    if first is None:
        raise TilefanError("the first tile's encoded output is missing")
    tags = [
        Tag(code, type_, count, base64.b64decode(value))
        for code, type_, count, value in first["tags"]
    ]
    reduction = tiff_reduction(pipeline, job)
    sizes = reduction.sizes
    groups = coarse_levels(store, job.job_id, reduction, indexes, reduction.pixels(first))

    replaced = {
        (tiles_key, level["level"])
        for group in joined
        for tiles_key in group["replaces"]
        for level in group["levels"]
    }
    by_level: list[list[tuple[str, Mapping[str, Any]]]] = [[] for _ in sizes]
    for index in [*indexes, *groups, *joined]:
        for level in index["levels"]:
            if (index["tiles_key"], level["level"]) not in replaced:
                by_level[level["level"]].append((index["tiles_key"], level))
    pages: list[Page] = []
    data: list[list[Range]] = []
    for number, (width, height) in enumerate(sizes):
        across = -(-width // TIFF_TILE)
        counts = np.zeros(across * -(-height // TIFF_TILE), dtype=np.uint64)
        orders: list[npt.NDArray[np.int64]] = []
        ranges: list[Range] = []
        # The workers' copies last, in the order of their reserved numbers (`reserved_part`).
        for tiles_key, level in sorted(by_level[number], key=lambda e: e[1].get("part", [0])[0]):
            table = unpack_tiles(level["tile_table"])
            positions = table[:, 1].astype(np.int64) * across + table[:, 0]
            counts[positions] = table[:, 2]
            orders.append(positions)
            if length := table_bytes(table):
                part, etag = level.get("part", (0, ""))
                ranges.append(Range(tiles_key, level["start"], length, part, etag))
        order = np.concatenate(orders) if orders else np.empty(0, dtype=np.int64)
        if order.size != counts.size:
            raise TilefanError(
                f"the workers wrote {order.size} of the {counts.size} tiles of page {number}"
            )
        page_tags = tags if number == 0 else without_metadata(tags)
        pages.append(Page(width, height, TIFF_TILE, page_tags, counts, number > 0, order))
        data.append(ranges)

    head, _size = layout(pages, bigtiff_above=BIGTIFF_ABOVE)
    key = keys.result(job.job_id, "tif")

    def parts() -> Iterator[bytes | Range]:
        yield head.head
        for level_data in reversed(data):
            yield from level_data

    assembly = (job.grid or {}).get("assembly") or {}
    size = assemble_object(store, key, parts(), "image/tiff", upload_id=assembly.get("upload_id"))
    return {
        "key": key,
        "format": job.output_format,
        "size_bytes": size,
        "width": plan.output_width,
        "height": plan.output_height,
        "bands": first["bands"],
        "pixel_format": first["format"],
    }

"""Merge for jpeg, png and webp: output tiles in row order into the encoder, its bytes to S3.

These formats cannot be assembled from independently encoded tiles, so the merger encodes
the whole image in one pass. It fetches the output tiles a row at a time (the next row
downloads while the current one is encoded), serves them to libvips as an uncompressed
stream (`tilefan.formats.pixel_stream`), and writes the encoder's bytes as they come in parts
of a multipart upload (`tilefan.state.multipart`). Nothing is written to local disk; memory
is about two rows of tiles, the encoder's own state and three upload parts. WebP is the
exception: libwebp encodes a whole picture, so libvips hands it the whole image in memory
(docs/design.md has the figures).

With a preview (`wants_preview`), a worker also cuts each block it writes into the preview's
tiles (`StreamedBatchWriter`); the merger joins their coarse levels as for a TIFF result.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyvips

from tilefan.errors import TilefanError, reason
from tilefan.formats.outputs import OUTPUT_FORMATS, encode_to_target
from tilefan.formats.pixel_stream import CallbackGuard, RowStream, TileRow, pixel_bytes
from tilefan.imaging.plan import TilePlan
from tilefan.state.multipart import MultipartWriter
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from tilefan.imaging.plan import Tile
    from tilefan.stages.pipeline import Pipeline
    from tilefan.stages.tileset_output import TileSetBatchWriter

__all__ = ["StreamedBatchWriter", "merge_streamed"]

_IO_THREADS = 16
"""Concurrent tile downloads: latency-bound, not CPU-bound."""

_ROWS_AHEAD = 1
"""Tile rows downloading while one is encoded: one hides S3's latency behind the encoder."""

_LAYOUT_FIELDS = frozenset(
    {
        "width",
        "height",
        "bands",
        "format",
        "coding",
        "interpretation",
        "xoffset",
        "yoffset",
        "xres",
        "yres",
        "filename",
        "vips-sequential",  # the loader's mark that the image is read once, top to bottom
    }
)
"""Fields the stream defines itself; every other field is metadata taken from tile 0."""


class StreamedBatchWriter:
    """Writes a manifest item's output tiles for the merger, and their tiles of the preview."""

    def __init__(self, pipeline: Pipeline, job_id: str, preview: TileSetBatchWriter) -> None:
        """``preview`` writes each block's preview tiles and, at the end, the batch's index."""
        self.pipeline = pipeline
        self.job_id = job_id
        self.preview = preview

    def add(self, tile: Tile, block: pyvips.Image) -> None:
        """Store the block as the tile's output, then cut its preview tiles."""
        block = block.copy_memory()  # read twice: run the chain once
        self.pipeline.store.put_tile(
            self.job_id, "out", tile.index, block, metadata=tile.index == 0
        )
        self.preview.add(tile, block)

    def finish(self) -> None:
        """Write the preview's index: it covers every block of the batch, so none is skipped."""
        self.preview.finish()


def merge_streamed(
    pipeline: Pipeline,
    job_id: str,
    plan: TilePlan,
    interpretation: str,
    output_format: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Encode the output tiles as one ``output_format`` result; returns the job's output."""
    extension, content_type = OUTPUT_FORMATS[output_format]
    key = keys.result(job_id, extension)
    # Tile 0 carries the input's metadata (ICC profile, EXIF, XMP, resolution), as libvips'
    # joins keep the first image's; it is downloaded once more in its row.
    first = pipeline.store.get_tile(job_id, "out", 0, interpretation)
    with ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="tile") as pool:
        stream = RowStream(
            _tile_rows(pipeline, job_id, plan, interpretation, first, pool),
            width=plan.output_width,
            height=plan.output_height,
            bands=first.bands,
            pixel_format=first.format,
            tile_height=plan.output_tile,
        )
        image = _with_metadata(stream.image(), first)
        with MultipartWriter(
            pipeline.store.client,
            pipeline.store.bucket,
            key,
            content_type=content_type,
            expected_bytes=stream.size,
        ) as writer:
            target = pyvips.TargetCustom()
            sink = CallbackGuard()
            target.on_write(sink.wrap(writer.write, -1))
            try:
                encode_to_target(image, target, output_format, options)
            except pyvips.Error as e:
                raise (
                    stream.guard.error
                    or sink.error
                    or TilefanError(f"the {output_format} encoder failed: {reason(e)}")
                ) from e
            if stream.guard.error is not None:
                raise stream.guard.error
            writer.close()
    return {
        "key": key,
        "format": output_format,
        "size_bytes": writer.size,
        "width": plan.output_width,
        "height": plan.output_height,
        "bands": image.bands,
        "pixel_format": image.format,
    }


def _tile_rows(
    pipeline: Pipeline,
    job_id: str,
    plan: TilePlan,
    interpretation: str,
    first: pyvips.Image,
    pool: ThreadPoolExecutor,
) -> Iterator[TileRow]:
    """Each row of output tiles as raw pixels, downloading `_ROWS_AHEAD` rows ahead."""
    pixel = pixel_bytes(first.bands, first.format)

    def fetch(index: int) -> tuple[int, bytes]:
        row, column = divmod(index, plan.columns)
        width = min(plan.output_tile, plan.output_width - column * plan.output_tile)
        height = min(plan.output_tile, plan.output_height - row * plan.output_tile)
        tile = pipeline.store.get_tile(job_id, "out", index, interpretation)
        pixels = tile.write_to_memory()
        if len(pixels) != width * height * pixel:
            raise TilefanError(
                f"output tile {index} is {tile.width}x{tile.height} {tile.bands}-band "
                f"{tile.format}; expected {width}x{height} like tile 0"
            )
        return width, pixels

    def download(row: int) -> list[Future[tuple[int, bytes]]]:
        first_index = row * plan.columns
        return [
            pool.submit(fetch, index) for index in range(first_index, first_index + plan.columns)
        ]

    pending = deque(download(row) for row in range(min(plan.rows, _ROWS_AHEAD + 1)))
    following = len(pending)
    while pending:
        row = pending.popleft()
        if following < plan.rows:
            pending.append(download(following))
            following += 1
        yield [future.result() for future in row]


def _with_metadata(image: pyvips.Image, first: pyvips.Image) -> pyvips.Image:
    """``image`` with tile 0's interpretation, resolution and metadata, and nothing else."""
    result = image.copy(interpretation=first.interpretation, xres=first.xres, yres=first.yres)
    for name in set(result.get_fields()) - set(first.get_fields()) - _LAYOUT_FIELDS:
        result.remove(name)
    for name in set(first.get_fields()) - _LAYOUT_FIELDS:
        result.set_type(first.get_typeof(name), name, first.get(name))
    return result

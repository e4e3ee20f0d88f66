"""Process: run the chain on each tile of one manifest item."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyvips

from tilefan.errors import TileFailed, TilefanError, TransientError, reason
from tilefan.formats.dz_tiles import TILESET_FORMATS
from tilefan.formats.tiled import source_block
from tilefan.imaging.execute import execute_tile
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import ImageSpec, Tile
from tilefan.stages.statistics import stored_statistics
from tilefan.stages.stream_merge import StreamedBatchWriter
from tilefan.stages.tiff_output import TiffBatchWriter
from tilefan.stages.tileset_output import TileSetBatchWriter, wants_preview
from tilefan.state.jobs import (
    TERMINAL,
    Job,
    TileOutcome,
    TileState,
)
from tilefan.state.storage import ObjectMissing

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline


def process_batch(
    pipeline: Pipeline, job_id: str, tiles: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Run the chain on each tile of one manifest item; a done tile is not done again."""
    job = pipeline.jobs.get(job_id)
    if job.status in TERMINAL or job.source is None or job.grid is None:
        return {"processed": 0, "skipped": len(tiles)}
    chain = _parsed_chain(json.dumps(job.operations, sort_keys=True))
    if chain.has_global():
        chain = chain.bind(stored_statistics(pipeline, job_id, chain, len(chain)))
    spec = ImageSpec(**job.source)
    output = _encoded_output(pipeline, job, tiles, chain, spec)
    batch = [Tile.from_compact(compact) for compact in tiles]
    if isinstance(output, TileSetBatchWriter):
        batch = [output.expand(tile) for tile in batch]
    # One write per band for the batch's starts and one for its outcomes, not two per tile.
    started = set(pipeline.jobs.tiles_started(job_id, [tile.index for tile in batch]))
    outcomes: list[TileOutcome] = []
    reached: set[int] = set()
    try:
        for tile in batch:
            # An encoded batch is one object, written whole: a retry redoes its done tiles.
            if tile.index in started or output is not None:
                reached.add(tile.index)
                _process_tile(
                    pipeline,
                    job_id,
                    tile,
                    chain,
                    spec,
                    job.grid,
                    outcomes,
                    output,
                )
        if output is not None:
            output.finish()
    finally:
        # Tiles after one that raised were never reached: PENDING again, no attempt counted.
        unreached = [TileOutcome(i, TileState.PENDING, 0) for i in started - reached]
        try:
            pipeline.jobs.tiles_finished(job_id, outcomes + unreached)
        finally:
            # Also when a tile failed: a cancellation removes the transcoded source under us.
            pipeline.discard_if_ended(job_id)
    return {"processed": len(outcomes), "skipped": len(tiles) - len(started)}


_BatchWriter = TiffBatchWriter | TileSetBatchWriter | StreamedBatchWriter


def _encoded_output(
    pipeline: Pipeline, job: Job, tiles: Sequence[Sequence[int]], chain: Chain, spec: ImageSpec
) -> _BatchWriter | None:
    """The writer of a batch whose worker encodes the result's own or its preview's tiles;
    None when it only stores output tiles for the merger."""
    if not tiles:
        return None
    preview = (
        TileSetBatchWriter(pipeline, job, tiles[0][0], chain, spec, preview=True)
        if wants_preview(job.output_format, job.output_options)
        else None
    )
    if job.output_format == "tiff":
        return TiffBatchWriter(pipeline, job, first_tile=tiles[0][0], preview=preview)
    if job.output_format in TILESET_FORMATS:
        return TileSetBatchWriter(pipeline, job, tiles[0][0], chain, spec)
    if preview is not None:
        return StreamedBatchWriter(pipeline, job.job_id, preview)
    return None


def _process_tile(
    pipeline: Pipeline,
    job_id: str,
    tile: Tile,
    chain: Any,
    spec: ImageSpec,
    grid: dict[str, Any],
    outcomes: list[TileOutcome],
    output: _BatchWriter | None,
) -> None:
    """Run the chain on one tile and add its outcome to ``outcomes``, also when it raises."""
    started = time.monotonic()
    try:
        read = grid["read"]
        block = source_block(
            pipeline.store, read["key"], read["page"], tile.source, spec.interpretation
        )
        result = execute_tile(chain, spec, block, tile.output)
        result = result.copy(interpretation=grid["interpretation"])
        if output is None:
            pipeline.store.put_tile(job_id, "out", tile.index, result, metadata=tile.index == 0)
        else:
            output.add(tile, result)
    except TransientError as e:
        # Retried by the state machine; kept on the tile in case the retries run out.
        outcomes.append(
            TileOutcome(
                tile.index, TileState.RUNNING, _ms_since(started), f"tile {tile.index}: {e}"
            )
        )
        raise
    except (pyvips.Error, TilefanError) as e:
        message = f"tile {tile.index}: {_failure_reason(pipeline, job_id, e)}"
        outcomes.append(TileOutcome(tile.index, TileState.FAILED, _ms_since(started), message))
        raise TileFailed(message) from e
    outcomes.append(TileOutcome(tile.index, TileState.DONE, _ms_since(started)))


def _failure_reason(pipeline: Pipeline, job_id: str, error: Exception) -> str:
    """Why a tile failed, in words for the job's owner."""
    if isinstance(error, ObjectMissing):
        # A cancellation removes the job's tiles under a running worker. Object keys are
        # internal: the tile says why its input is gone, not where it was.
        ended = pipeline.jobs.get(job_id).status
        return f"the job was {ended.value.lower()}" if ended in TERMINAL else "its input is missing"
    return reason(error)


@functools.lru_cache(maxsize=64)
def _parsed_chain(operations: str) -> Chain:
    """A job's chain, validated once per process rather than once per batch.

    Validation builds the operations' JSON schema (tens of milliseconds), which a warm worker
    would otherwise pay on every manifest item. A `Chain` is an immutable tuple of frozen
    steps, so one instance can serve every batch and thread.
    """
    return parse_chain(json.loads(operations))


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)

"""Process: run the chain on each tile of one manifest item."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyvips

from tilefan.errors import TileFailed, TilefanError, TransientError, reason
from tilefan.imaging.execute import execute_tile
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import ImageSpec, Tile
from tilefan.stages.statistics import stored_statistics
from tilefan.state.jobs import (
    TERMINAL,
)

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
    processed = 0
    try:
        for compact in tiles:
            tile = Tile.from_compact(compact)
            if not pipeline.jobs.tile_started(job_id, tile.index):
                continue
            _process_tile(pipeline, job_id, tile, chain, spec, job.grid["interpretation"])
            processed += 1
    finally:
        # Also when a tile failed: a cancellation removes the source tiles under us.
        pipeline.discard_if_ended(job_id)
    return {"processed": processed, "skipped": len(tiles) - processed}


def _process_tile(
    pipeline: Pipeline, job_id: str, tile: Tile, chain: Any, spec: ImageSpec, interpretation: str
) -> None:
    started = time.monotonic()
    try:
        block = pipeline.store.get_tile(job_id, "src", tile.index, spec.interpretation)
        result = execute_tile(chain, spec, block, tile.output)
        pipeline.store.put_tile(
            job_id,
            "out",
            tile.index,
            result.copy(interpretation=interpretation),
            metadata=tile.index == 0,
        )
    except TransientError as e:
        # Retried by the state machine; kept on the tile in case the retries run out.
        pipeline.jobs.tile_retrying(job_id, tile.index, f"tile {tile.index}: {e}")
        raise
    except (pyvips.Error, TilefanError) as e:
        message = f"tile {tile.index}: {reason(e)}"
        pipeline.jobs.tile_finished(job_id, tile.index, _ms_since(started), error=message)
        raise TileFailed(message) from e
    pipeline.jobs.tile_finished(job_id, tile.index, _ms_since(started))


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

"""Statistics passes: whole-image values for global steps and for the ``stats`` output.

Only chains with global steps, or jobs whose output is ``stats``, have passes. The splitter
writes each pass's manifest (`prepare`); workers read their blocks of the source by range and
store one partial per batch (`statistics_batch`); a reduce combines them in batch order,
which is tile order, and moves the job on (`reduce_statistics`): to the next pass, to
processing, or, for a ``stats`` output, to SUCCEEDED with the statistics as the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyvips

from tilefan.errors import InvalidTileSize, TileFailed, TilefanError, reason
from tilefan.formats.tiled import source_block
from tilefan.imaging.execute import StatisticsPass, pass_plan, statistics_passes, tile_statistics
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import ImageSpec, Tile, TilePlan
from tilefan.imaging.statistics import Statistics
from tilefan.stages.merge import _seconds_since_iso
from tilefan.stages.second_fanout import fanout_manifest_key
from tilefan.state.jobs import MAX_TILES, TERMINAL, InvalidTransition, JobStatus
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline

__all__ = [
    "REDUCE_THREADS",
    "STATS_FORMAT",
    "passes_for",
    "prepare",
    "reduce_statistics",
    "statistics_batch",
    "stored_statistics",
    "track",
]

STATS_FORMAT = "stats"
"""The output format that is the statistics of the chain's result instead of an image."""

REDUCE_THREADS = 16
"""Partials the reduce reads at once: S3 answers each GET in 100-200 ms, so at 10 GP (2,401
partials) reading them one after another would take six minutes."""


def passes_for(chain: Chain, spec: ImageSpec, output_format: str) -> list[StatisticsPass]:
    """The statistics passes of a job, in order (none for most jobs)."""
    return statistics_passes(chain, spec, output_statistics=output_format == STATS_FORMAT)


def prepare(
    pipeline: Pipeline,
    job_id: str,
    spec: ImageSpec,
    chain: Chain,
    tile_size: int,
    passes: Sequence[StatisticsPass],
) -> list[dict[str, int]]:
    """Write every pass's manifest; its workers read their blocks of the source by range.

    A pass's grid depends on the shape of the steps before it, never on statistics, so all
    passes are planned here, once. Returns each pass's grid, for the job's record (`track`).
    """
    grids: list[dict[str, int]] = []
    for step in passes:
        plan = pass_plan(chain, spec, tile_size, {}, step.upto)
        if plan.tile_count > MAX_TILES:
            raise InvalidTileSize(
                f"tile_size {tile_size} cuts the statistics pass into {plan.tile_count:,} "
                f"tiles; at most {MAX_TILES:,} are supported, so use a larger tile size"
            )
        manifest = plan.manifest(pipeline.settings.tiles_per_item)
        for item in manifest:
            item["job_id"] = job_id
            item["upto"] = step.upto
        pipeline.store.put_json(keys.statistics_manifest(job_id, step.upto), manifest)
        grids.append(
            {
                "upto": step.upto,
                "tile_count": plan.tile_count,
                "rows": plan.rows,
                "columns": plan.columns,
                "width": plan.output_width,
                "height": plan.output_height,
            }
        )
    return grids


def track(pipeline: Pipeline, job_id: str, grids: Sequence[Mapping[str, int]]) -> None:
    """Every pass's tiles PENDING in the job's tile records, so a status read shows each pass
    as its batches finish (after the tiles' own records are made, which this must follow)."""
    pipeline.jobs.create_pass_tiles(job_id, {grid["upto"]: grid["tile_count"] for grid in grids})


def stored_statistics(
    pipeline: Pipeline, job_id: str, chain: Chain, upto: int
) -> dict[int, Statistics]:
    """The combined statistics of every global step before ``upto``, from earlier passes."""
    return {
        index: Statistics.from_bytes(pipeline.store.get_bytes(keys.statistics(job_id, index)))
        for index, _ in chain.global_steps()
        if index < upto
    }


def statistics_batch(
    pipeline: Pipeline, job_id: str, upto: int, batch: int, tiles: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Store the partial statistics of one batch of a pass's tiles, combined in tile order."""
    job = pipeline.jobs.get(job_id)
    if job.status in TERMINAL or job.source is None or job.grid is None:
        return {"processed": 0, "skipped": len(tiles)}
    chain = parse_chain(job.operations)
    spec = ImageSpec(**job.source)
    (step,) = [p for p in passes_for(chain, spec, job.output_format) if p.upto == upto]
    earlier = stored_statistics(pipeline, job_id, chain, upto)
    plan = pass_plan(chain, spec, job.tile_size, earlier, upto)
    read = job.grid["read"]
    try:
        batch_tiles = [Tile.from_compact(compact) for compact in tiles]
        parts = [_tile_part(pipeline, read, plan, tile, step.histogram) for tile in batch_tiles]
        pipeline.store.put_bytes(
            keys.statistics_part(job_id, upto, batch), Statistics.combine(parts).to_bytes()
        )
        pipeline.jobs.pass_tiles_done(job_id, upto, [tile.index for tile in batch_tiles])
    except TileFailed as e:
        pipeline.store.put_json(
            keys.statistics_failure(job_id), {"code": e.code, "message": str(e)}
        )
        raise
    finally:
        # Also when a tile failed: a cancellation removes the transcoded source under us.
        pipeline.discard_if_ended(job_id)
    return {"processed": len(parts), "skipped": 0}


def _tile_part(
    pipeline: Pipeline, read: dict[str, Any], plan: TilePlan, tile: Tile, histogram: bool
) -> Statistics:
    try:
        block = source_block(
            pipeline.store, read["key"], read["page"], tile.source, plan.spec.interpretation
        )
        return tile_statistics(plan, block, tile, histogram=histogram)
    except pyvips.Error as e:
        raise TileFailed(f"statistics of tile {tile.index}: {reason(e)}") from e


def reduce_statistics(pipeline: Pipeline, job_id: str, manifest_key: str) -> dict[str, Any]:
    """Combine a pass's partials and move the job on; safe to run again on a retry.

    Returns what the state machine's loop needs: the next pass's manifest key (or None), and
    whether the job finished (a ``stats`` output has no processing pass).
    """
    job = pipeline.jobs.get(job_id)
    if job.source is None or job.grid is None:
        raise TilefanError(f"job {job_id} has no tile grid: it was never split")
    manifest = pipeline.store.get_json(manifest_key)
    upto = int(manifest[0]["upto"])
    with ThreadPoolExecutor(REDUCE_THREADS) as pool:
        # map keeps batch order, which is tile order: the sums are combined in one order.
        parts = list(
            pool.map(
                lambda n: Statistics.from_bytes(
                    pipeline.store.get_bytes(keys.statistics_part(job_id, upto, n))
                ),
                range(len(manifest)),
            )
        )
    combined = Statistics.combine(parts)
    pipeline.store.put_bytes(keys.statistics(job_id, upto), combined.to_bytes())
    chain = parse_chain(job.operations)
    passes = passes_for(chain, ImageSpec(**job.source), job.output_format)
    later = [p for p in passes if p.upto > upto]
    spent = {"t_stats": job.timings.get("stats", 0.0) + _seconds_since_iso(job.updated_at)}
    answer: dict[str, Any] = {
        "manifest_key": keys.manifest(job_id),
        "tile_count": job.grid["tile_count"],
        "batch_count": math.ceil(job.grid["tile_count"] / pipeline.settings.tiles_per_item),
        "statistics_manifest_key": None,
        "fanout_manifest_key": fanout_manifest_key(job),
        "finished": False,
    }
    try:
        if later:
            pipeline.jobs.transition(
                job_id, JobStatus.STATISTICS, allowed_from={JobStatus.STATISTICS}, **spent
            )
            answer["statistics_manifest_key"] = keys.statistics_manifest(job_id, later[0].upto)
        elif job.output_format == STATS_FORMAT:
            output = _save_document(pipeline, job_id, combined, job.grid)
            pipeline.jobs.transition(
                job_id,
                JobStatus.SUCCEEDED,
                allowed_from={JobStatus.STATISTICS},
                output=output,
                **spent,
            )
            answer["finished"] = True  # the next task removes the intermediates
        else:
            pipeline.jobs.transition(
                job_id, JobStatus.PROCESSING, allowed_from={JobStatus.STATISTICS}, **spent
            )
    except InvalidTransition:
        pipeline.discard_if_ended(job_id)
        raise
    return answer


def _save_document(
    pipeline: Pipeline, job_id: str, statistics: Statistics, grid: dict[str, Any]
) -> dict[str, Any]:
    """Upload the statistics as the job's JSON result; returns the job's output record."""
    body = json.dumps(statistics.document(), separators=(",", ":")).encode()
    key = keys.result(job_id, "json")
    pipeline.store.put_bytes(key, body, "application/json")
    return {
        "key": key,
        "format": STATS_FORMAT,
        "size_bytes": len(body),
        "width": grid["output_width"],
        "height": grid["output_height"],
        "bands": statistics.bands,
        "pixel_format": statistics.pixel_format,
    }

"""Merge: assemble the output tiles, save the result, mark the job SUCCEEDED."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tilefan.errors import TilefanError
from tilefan.formats.outputs import STREAMED_FORMATS
from tilefan.imaging.operations import parse_chain
from tilefan.imaging.plan import ImageSpec, TilePlan, plan_tiles
from tilefan.stages.stream_merge import merge_streamed
from tilefan.stages.tiff_output import assemble_tiff, output_tile_rule
from tilefan.stages.tileset_output import assemble_preview, assemble_tileset, wants_preview
from tilefan.state.jobs import (
    InvalidTransition,
    Job,
    JobStatus,
)

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline

_ERROR_CODES: dict[str, str] = {}


def merge(pipeline: Pipeline, job_id: str) -> dict[str, Any]:
    """Assemble the result from the workers' output, save it, and mark the job SUCCEEDED."""
    started = time.monotonic()
    job = pipeline.jobs.get(job_id)
    if job.grid is None or job.source is None:
        raise TilefanError(f"job {job_id} has no tile grid: it was never split")
    # The map stage ran from the PROCESSING transition until now; a retried merge keeps
    # the figure the first attempt recorded.
    timing = (
        {"t_process": _seconds_since_iso(job.updated_at)}
        if job.status is JobStatus.PROCESSING
        else {}
    )
    pipeline.jobs.transition(
        job_id,
        JobStatus.MERGING,
        allowed_from={JobStatus.PROCESSING, JobStatus.MERGING},
        **timing,
    )
    progress = pipeline.jobs.progress(job_id, job.grid["tile_count"], consistent=True)
    if progress.done != progress.total:
        raise TilefanError(
            f"{progress.total - progress.done} of {progress.total} tiles are not done"
        )
    plan = plan_tiles(
        ImageSpec(**job.source),
        parse_chain(job.operations),
        job.tile_size,
        output_tile_rule=output_tile_rule(job.output_format, job.output_options),
    )
    output = _assembler(job.output_format)(pipeline, job, plan)
    wanted = wants_preview(job.output_format, job.output_options)
    preview = assemble_preview(pipeline, job, plan) if wanted else None
    if preview is not None:
        output["preview"] = preview
    key = output["key"]
    try:
        pipeline.jobs.transition(
            job_id,
            JobStatus.SUCCEEDED,
            allowed_from={JobStatus.MERGING},
            output=output,
            t_merge=time.monotonic() - started,
        )
    except InvalidTransition:
        pipeline.discard_if_ended(job_id)
        raise
    # The intermediates go in the state machine's next task (`cleanup`): once the job has
    # SUCCEEDED, a refused delete must not make this merge run again.
    return {"status": JobStatus.SUCCEEDED.value, "output_key": key}


def _assembler(output_format: str) -> Callable[[Pipeline, Job, TilePlan], dict[str, Any]]:
    """How a format's result is made: TIFF around the workers' encoded tiles, JPEG, PNG and
    WebP streamed from the tiles, DeepZoom and IIIF from the workers' tiles and pieces."""
    if output_format == "tiff":
        return assemble_tiff
    if output_format in STREAMED_FORMATS:
        return _stream
    return assemble_tileset


def _stream(pipeline: Pipeline, job: Job, plan: TilePlan) -> dict[str, Any]:
    assert job.grid is not None  # merge() checked it
    return merge_streamed(
        pipeline,
        job.job_id,
        plan,
        job.grid["interpretation"],
        job.output_format,
        job.output_options,
    )


def _seconds_since_iso(stamp: str) -> float:
    if not stamp:
        return 0.0
    return max(0.0, (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds())

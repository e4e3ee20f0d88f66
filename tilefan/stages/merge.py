"""Merge: assemble the output tiles, save the result, mark the job SUCCEEDED."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyvips

from tilefan.errors import TilefanError
from tilefan.formats.outputs import STREAMED_FORMATS, save_output
from tilefan.imaging.operations import parse_chain
from tilefan.imaging.plan import ImageSpec, TilePlan, plan_tiles
from tilefan.stages.scratch import invocation_scratch
from tilefan.stages.stream_merge import merge_streamed
from tilefan.stages.tiff_output import assemble_tiff, output_tile_rule
from tilefan.state.jobs import (
    InvalidTransition,
    Job,
    JobStatus,
)
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline

_IO_THREADS = 16
"""Concurrent S3 transfers in the splitter and merger: latency-bound, not CPU-bound."""

_MAX_OPEN_FILES = 256
"""The merger joins at most this many cell or strip files at once (Lambda has 1,024 descriptors)."""

_CELL_PIXELS = 8 * 2**20
"""Pixels of output tiles the merger holds in memory at once: a cell, written to one file."""

_ERROR_CODES: dict[str, str] = {}


def merge(pipeline: Pipeline, job_id: str) -> dict[str, Any]:
    """Assemble the output tiles strip by strip, save, upload, and mark the job SUCCEEDED."""
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
        output_tile_rule=output_tile_rule(job.output_format),
    )
    output = _assembler(job.output_format)(pipeline, job, plan)
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
    pipeline.store.delete_prefix(keys.job_prefix(job_id))
    return {"status": JobStatus.SUCCEEDED.value, "output_key": key}


def _assembler(output_format: str) -> Callable[[Pipeline, Job, TilePlan], dict[str, Any]]:
    """How a format's result is made: TIFF around the workers' encoded tiles, JPEG, PNG and
    WebP streamed from the tiles, a DeepZoom zip saved whole."""
    if output_format == "tiff":
        return assemble_tiff
    if output_format in STREAMED_FORMATS:
        return _stream
    return _save_whole


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


def _save_whole(pipeline: Pipeline, job: Job, plan: TilePlan) -> dict[str, Any]:
    """Join the output tiles on scratch, save the whole image, upload it; the output record."""
    assert job.grid is not None  # merge() checked it
    with invocation_scratch(pipeline.settings.scratch_dir) as scratch:
        image = _join_cells(pipeline, job.job_id, plan, Path(scratch), job.grid["interpretation"])
        saved = save_output(image, Path(scratch), job.output_format, job.output_options)
        key = keys.result(job.job_id, saved.extension)
        pipeline.store.upload(saved.path, key, saved.content_type)
        return {
            "key": key,
            "format": job.output_format,
            "size_bytes": saved.path.stat().st_size,
            "width": plan.output_width,
            "height": plan.output_height,
            "bands": image.bands,
            "pixel_format": image.format,
        }


def _join_cells(
    pipeline: Pipeline, job_id: str, plan: TilePlan, scratch: Path, interpretation: str
) -> pyvips.Image:
    """The output image over cell files on disk, each a few tiles of one row.

    Only one cell's tiles are in memory at a time, so what the merger holds does not grow
    with the image's width, and every pixel is written to scratch once. Cells widen when
    the grid would need more files open than the merger may have; with more rows than
    that, a cell is a whole row.
    """
    cells_per_row = max(1, _MAX_OPEN_FILES // plan.rows)
    across = max(
        1,
        min(_IO_THREADS, _CELL_PIXELS // plan.tile_size**2),
        math.ceil(plan.columns / cells_per_row),
    )
    grid: list[list[Path]] = []
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        for row in range(plan.rows):
            cells = []
            for column in range(0, plan.columns, across):
                first = row * plan.columns + column
                indices = range(first, first + min(across, plan.columns - column))
                tiles = list(
                    pool.map(
                        lambda i: pipeline.store.get_tile(job_id, "out", i, interpretation),
                        indices,
                    )
                )
                path = scratch / f"cell-{row:06d}-{column:06d}.v"
                _join(tiles, across=True).write_to_file(str(path))
                cells.append(path)
            grid.append(cells)
    return _join_grid(grid, scratch).copy(interpretation=interpretation)


def _join(images: Sequence[pyvips.Image], *, across: bool) -> pyvips.Image:
    """Images side by side or stacked; only the last may be narrower or shorter."""
    if across:
        width, height = sum(image.width for image in images), images[0].height
    else:
        width, height = images[0].width, sum(image.height for image in images)
    # arrayjoin spaces cells by the largest; only the last is smaller, so crop.
    joined = pyvips.Image.arrayjoin(images, across=len(images) if across else 1)
    return joined.crop(0, 0, width, height)


def _join_grid(grid: Sequence[Sequence[Path]], scratch: Path) -> pyvips.Image:
    """A grid of cell files as one image: at most `_MAX_OPEN_FILES` cells, or one per row."""
    if len(grid) > _MAX_OPEN_FILES:
        return _stack_files([row[0] for row in grid], scratch)
    cells = [[pyvips.Image.new_from_file(str(path)) for path in row] for row in grid]
    return _join([_join(row, across=True) for row in cells], across=False)


def _stack_files(paths: Sequence[Path], scratch: Path) -> pyvips.Image:
    """Stack image files, merging groups first so few files are open at once."""
    if len(paths) <= _MAX_OPEN_FILES:
        return _join([pyvips.Image.new_from_file(str(path)) for path in paths], across=False)
    merged = []
    for start in range(0, len(paths), _MAX_OPEN_FILES):
        # Named after its first file, so no two groups or levels share a name.
        path = scratch / f"{paths[start].stem}-group.v"
        _stack_files(paths[start : start + _MAX_OPEN_FILES], scratch).write_to_file(str(path))
        merged.append(path)
    return _stack_files(merged, scratch)


def _seconds_since_iso(stamp: str) -> float:
    if not stamp:
        return 0.0
    return max(0.0, (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds())

"""Split: open the upload by range, check it, plan the tiles, write the manifest.

A tiled TIFF is planned from its header, and workers read it where it is; anything else is
transcoded once into a tiled TIFF that they read instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pyvips

from tilefan.errors import InvalidTileSize, TooManyPixels
from tilefan.formats.dz_tiles import TILESET_FORMATS, TileSetLayout
from tilefan.formats.output_limits import check_output_of_input
from tilefan.formats.source import upright
from tilefan.formats.tiled import open_object, range_readable, transcode, transcode_tile_edge
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import (
    ImageSpec,
    TilePlan,
    check_chain,
    check_worker_memory,
    plan_tiles,
    stage_sizes,
)
from tilefan.stages import statistics
from tilefan.stages.second_fanout import fanout_items
from tilefan.stages.tiff_output import output_tile_rule, prepare_assembly, tiles_per_item
from tilefan.state.jobs import (
    MAX_TILES,
    InvalidTransition,
    Job,
    JobStatus,
)
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline


def split(pipeline: Pipeline, job_id: str) -> dict[str, Any]:
    """Plan the tiles from the upload's header, transcode it unless tiled, write the manifest."""
    started = time.monotonic()
    job = pipeline.jobs.get(job_id)
    pipeline.jobs.transition(
        job_id, JobStatus.SPLITTING, allowed_from={JobStatus.QUEUED, JobStatus.SPLITTING}
    )
    chain = parse_chain(job.operations)
    header, origin = open_object(
        pipeline.store,
        keys.upload(job_id),
        name="upload",
        max_pixels=pipeline.settings.max_pixels,
        max_pixels_per_byte=pipeline.settings.max_pixels_per_byte,
        access="sequential",
    )
    spec = ImageSpec.of(upright(header))
    _check_output_size(chain, upright(header), pipeline.settings.max_pixels)
    # Before any pixel is decoded: a result that cannot be made fails the job now.
    check_output_of_input(
        chain,
        job.output_format,
        job.output_options,
        spec.width,
        spec.height,
        merger_timeout=pipeline.settings.merger_timeout,
        merger_memory_mb=pipeline.settings.merger_memory_mb,
        bands=header.bands,
        pixel_format=header.format,
    )
    plan = plan_tiles(
        spec,
        chain,
        job.tile_size,
        output_tile_rule=output_tile_rule(job.output_format, job.output_options),
    )
    if plan.tile_count > MAX_TILES:
        raise InvalidTileSize(
            f"tile_size {job.tile_size} cuts this image into {plan.tile_count:,} tiles; "
            f"at most {MAX_TILES:,} are supported, so use a larger tile size"
        )
    check_worker_memory(plan, pipeline.settings.worker_memory_mb)
    if job.output_format in TILESET_FORMATS:
        layout = TileSetLayout.from_options(job.output_format, job.output_options)
        layout.check_result(check_chain(chain, spec).format)
    read_key, written = keys.upload(job_id), 0
    if not range_readable(header):
        read_key = keys.source(job_id)
        edge = transcode_tile_edge(job.tile_size)
        written = transcode(header, origin, pipeline.store, read_key, edge)
    passes = statistics.passes_for(chain, spec, job.output_format)
    pass_grids = statistics.prepare(pipeline, job_id, spec, chain, job.tile_size, passes)
    per_item = _tiles_per_item(plan, job, pipeline.settings.tiles_per_item)
    manifest = plan.manifest(per_item)
    for item in manifest:
        item["job_id"] = job_id
    pipeline.store.put_json(keys.manifest(job_id), manifest)
    grid = _grid(plan, bytes_split=written)
    fanout = fanout_items(pipeline, job, plan, grid, manifest)
    if fanout:
        pipeline.store.put_json(keys.fanout(job_id), fanout)
    pipeline.jobs.create_tiles(job_id, plan.tile_count)
    statistics.track(pipeline, job_id, pass_grids)
    # Last before the transition: an upload opened for a job that then fails is aborted
    # with what it left (`discard_if_ended`).
    if job.output_format == "tiff":
        grid["assembly"] = prepare_assembly(pipeline, job_id, plan, job.output_options, per_item)
    try:
        pipeline.jobs.transition(
            job_id,
            JobStatus.STATISTICS if passes else JobStatus.PROCESSING,
            allowed_from={JobStatus.SPLITTING},
            source=asdict(spec),
            grid={
                **grid,
                # What the workers open by range: the upload itself, or its transcode.
                "read": {"key": read_key, "page": 0},
                "bytes_read": origin.remote.bytes_fetched,
                "passes": pass_grids,
                "fanout_items": len(fanout),
            },
            t_split=time.monotonic() - started,
        )
    except InvalidTransition:
        pipeline.discard_if_ended(job_id)
        raise
    return {
        "manifest_key": keys.manifest(job_id),
        "tile_count": plan.tile_count,
        "batch_count": len(manifest),
        "statistics_manifest_key": (
            keys.statistics_manifest(job_id, passes[0].upto) if passes else None
        ),
        "fanout_manifest_key": keys.fanout(job_id) if fanout else None,
    }


def _tiles_per_item(plan: TilePlan, job: Job, default: int) -> int:
    """Batch size: TIFF and DeepZoom zip workers write one object per batch, sized to be
    copied on S3 (a zip's JPEG tiles shrink about as JPEG-in-TIFF does)."""
    if job.output_format == "tiff":
        return tiles_per_item(plan, job.output_options, default)
    if job.output_format == "dz":
        return tiles_per_item(plan, {"compression": "jpeg"}, default)
    return default


def _check_output_size(chain: Chain, header: pyvips.Image, max_pixels: int) -> None:
    """Refuse, from the header and before decoding, a chain whose output is too large.

    An upscaling resize makes the output far larger than the input, which only the input's
    pixels were checked against; the merger would find out after every tile was processed.
    """
    width, height = stage_sizes(chain, header.width, header.height)[-1]
    if width * height > max_pixels:
        raise TooManyPixels(
            f"the chain makes a {width}x{height} = {width * height:,}-pixel output from this "
            f"{header.width}x{header.height} input; the limit is {max_pixels:,}"
        )


def _grid(plan: TilePlan, *, bytes_split: int) -> dict[str, Any]:
    return {
        "rows": plan.rows,
        "columns": plan.columns,
        "tile_count": plan.tile_count,
        "output_tile": plan.output_tile,
        "output_width": plan.output_width,
        "output_height": plan.output_height,
        "interpretation": plan.output_interpretation,
        "bytes_split": bytes_split,
    }

"""Split: open the upload, check it, plan the tiles, cut the source tiles, write the manifest."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyvips

from tilefan.errors import InvalidTileSize, TooManyPixels
from tilefan.formats.source import decode_to_scratch, open_checked, upright
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import ImageSpec, TilePlan, plan_tiles, stage_sizes
from tilefan.stages.scratch import invocation_scratch
from tilefan.state.jobs import (
    MAX_TILES,
    InvalidTransition,
    JobStatus,
)
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline

_IO_THREADS = 16
"""Concurrent S3 transfers in the splitter and merger: latency-bound, not CPU-bound."""


def split(pipeline: Pipeline, job_id: str) -> dict[str, Any]:
    """Decode the upload once, cut the source tiles, write the manifest and the tile items."""
    started = time.monotonic()
    job = pipeline.jobs.get(job_id)
    pipeline.jobs.transition(
        job_id, JobStatus.SPLITTING, allowed_from={JobStatus.QUEUED, JobStatus.SPLITTING}
    )
    chain = parse_chain(job.operations)
    with invocation_scratch(pipeline.settings.scratch_dir) as scratch:
        upload = Path(scratch) / "upload"
        pipeline.store.download(keys.upload(job_id), upload)
        header = open_checked(
            upload,
            max_pixels=pipeline.settings.max_pixels,
            max_pixels_per_byte=pipeline.settings.max_pixels_per_byte,
            access="sequential",
        )
        _check_output_size(chain, upright(header), pipeline.settings.max_pixels)
        source = decode_to_scratch(header, Path(scratch) / "source.v")
        spec = ImageSpec.of(source)
        plan = plan_tiles(spec, chain, job.tile_size)
        if plan.tile_count > MAX_TILES:
            raise InvalidTileSize(
                f"tile_size {job.tile_size} cuts this image into {plan.tile_count:,} tiles; "
                f"at most {MAX_TILES:,} are supported, so use a larger tile size"
            )
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            sizes = list(
                pool.map(
                    lambda tile: pipeline.store.put_tile(
                        job_id,
                        "src",
                        tile.index,
                        source.crop(*tile.source),
                        # The output takes its metadata from tile 0 (libvips' joins keep
                        # the first image's); an ICC profile or XMP of megabytes copied
                        # into every tile would multiply the bytes moved by the tile count.
                        metadata=tile.index == 0,
                    ),
                    plan.tiles(),
                )
            )
    manifest = plan.manifest(pipeline.settings.tiles_per_item)
    for item in manifest:
        item["job_id"] = job_id
    pipeline.store.put_json(keys.manifest(job_id), manifest)
    pipeline.jobs.create_tiles(job_id, plan.tile_count)
    try:
        pipeline.jobs.transition(
            job_id,
            JobStatus.PROCESSING,
            allowed_from={JobStatus.SPLITTING},
            source=asdict(spec),
            grid=_grid(plan, bytes_split=sum(sizes)),
            t_split=time.monotonic() - started,
        )
    except InvalidTransition:
        pipeline.discard_if_ended(job_id)
        raise
    return {
        "manifest_key": keys.manifest(job_id),
        "tile_count": plan.tile_count,
        "batch_count": len(manifest),
    }


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

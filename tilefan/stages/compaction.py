"""A COG's small levels joined across batches, in parallel, before the merge.

A batch's share of a pyramid level is four times smaller a level down: under S3's 5 MiB part
minimum it cannot be copied server-side, and the merger would read it and send it on itself,
bytes that grow with the image. When a COG has more batches than one group holds, the
splitter writes a second manifest, groups of consecutive batches (`compaction_groups`), and
the state machine's second fan-out (``CompactLevels``) gives each group to a tile worker,
warm from the map (`compact`): it writes one object holding, level by level, the group's ranges of
every level some batch holds under 5 MiB (copied server-side where a range passes it,
gathered otherwise, by `assemble_object`), and an index of where each tile now lies. The
merger takes those levels from the groups' objects, ranges it copies, so what passes through
it no longer grows with the number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tilefan.formats.tiff_tiles import TiffEncoding, level_sizes
from tilefan.imaging.plan import TilePlan
from tilefan.stages.tiff_output import (
    expected_batch_bytes,
    level_length,
    pack_tiles,
    table_bytes,
    unpack_tiles,
    worker_levels,
)
from tilefan.state.jobs import TERMINAL
from tilefan.state.multipart import MIN_PART, Range, assemble_object
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline

__all__ = ["compact", "compaction_groups"]

_MAX_GROUP = 64
"""Batches per group at most: a group's task reads their indexes and joins their small
levels, through its parts in flight."""


def compaction_groups(
    plan: TilePlan, options: Mapping[str, Any], manifest: Sequence[Mapping[str, Any]]
) -> list[list[int]]:
    """Groups of the batches' first tiles, or none when the merger gathers little anyway:
    not a pyramid, every level copied, or all batches within one group.

    A group holds enough batches for the smallest level workers write to pass 5 MiB, at the
    encoding's expected ratio (`tiles_per_item`'s); a job of one group is left to the merger,
    which then gathers at most that group's small levels.
    """
    encoding = TiffEncoding.from_options(options)
    if not encoding.pyramid or not manifest:
        return []
    sizes = level_sizes(plan.output_width, plan.output_height, pyramid=True)
    levels = worker_levels(plan.output_tile, sizes)
    per_batch = len(manifest[0]["tiles"])
    smallest = expected_batch_bytes(plan, options, per_batch) / 4 ** (levels - 1)
    if smallest >= MIN_PART:
        return []
    size = min(_MAX_GROUP, max(2, math.ceil(MIN_PART / smallest)))
    firsts = [int(item["tiles"][0][0]) for item in manifest]
    if len(firsts) <= size:
        return []
    return [firsts[start : start + size] for start in range(0, len(firsts), size)]


def compact(pipeline: Pipeline, job_id: str, batches: Sequence[int]) -> dict[str, Any]:
    """Join the small levels of the batches starting at ``batches`` into one object."""
    job = pipeline.jobs.get(job_id)
    if job.status in TERMINAL:
        return {"levels": 0}
    store = pipeline.store
    indexes = store.get_json_all(keys.encoded(job_id, first, "index") for first in batches)
    small = sorted(
        {
            level["level"]
            for index in indexes
            for level in index["levels"]
            if level_length(level) < MIN_PART
        }
    )
    key = keys.encoded(job_id, batches[0], "compact-tiles")
    joined: dict[str, Any] = {
        "replaces": [index["tiles_key"] for index in indexes],
        "tiles_key": key,
        "levels": [],
    }

    def ranges() -> Iterator[Range]:
        start = 0
        for number in small:
            entry_start = start
            tables = []
            for index in indexes:
                level = next(level for level in index["levels"] if level["level"] == number)
                tables.append(unpack_tiles(level["tile_table"]))
                if length := table_bytes(tables[-1]):
                    yield Range(index["tiles_key"], level["start"], length)
                    start += length
            table = np.concatenate(tables)
            joined["levels"].append(
                {"level": number, "start": entry_start, "tile_table": pack_tiles(table)}
            )

    if small:
        assemble_object(store, key, ranges(), "application/octet-stream")
    store.put_json(keys.encoded(job_id, batches[0], "compact"), joined)
    pipeline.discard_if_ended(job_id)
    return {"levels": len(small)}

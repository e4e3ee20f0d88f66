"""The state machine's second fan-out (``CompactLevels``), after the tiles, before the merge.

Its items, each a tile worker's task (warm from the map), are of two kinds:

- ``{"batches": [first tile, ...]}``: consecutive batches of a COG whose small levels are
  joined into one object (`compaction`);
- ``{"reduce": kind, "group": n, "batches": [...]}``: group ``n`` of the first round of a
  pyramid's coarse levels (`reduction`), the TIFF's, the tile set's or the preview's, when
  that level is larger than one `FANOUT_SIDE` group; ``batches`` hold the blocks whose
  pieces it reads. The merger then starts from the groups' pieces (`fanned_out`).

The splitter writes the items (`fanout_items`) to one object, the Map's item list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tilefan.errors import TilefanError, TransientError
from tilefan.formats.dz_tiles import TILESET_FORMATS
from tilefan.imaging.plan import TilePlan
from tilefan.stages.compaction import compaction_groups
from tilefan.stages.reduction import Piece, Reduction, reduce_group
from tilefan.stages.tiff_output import tiff_reduction
from tilefan.stages.tileset_output import set_reduction, wants_preview
from tilefan.state.jobs import TERMINAL
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline
    from tilefan.state.jobs import Job

__all__ = ["fanout_items", "fanout_manifest_key", "reduce", "says_why"]

_REDUCTIONS: dict[str, Callable[[Pipeline, Job], Reduction]] = {
    "tiff": tiff_reduction,
    "set": lambda pipeline, job: set_reduction(pipeline, job, preview=False),
    "preview": lambda pipeline, job: set_reduction(pipeline, job, preview=True),
}


def fanout_items(
    pipeline: Pipeline,
    job: Job,
    plan: TilePlan,
    grid: Mapping[str, Any],
    manifest: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The second fan-out's items for a job of ``plan`` cut into ``manifest``'s batches;
    none when the merger does all of it."""
    items: list[dict[str, Any]] = []
    if job.output_format == "tiff":
        groups = compaction_groups(plan, job.output_options, manifest)
        items += [{"batches": group} for group in groups]
    batch_of = {
        int(tile[0]): int(item["tiles"][0][0]) for item in manifest for tile in item["tiles"]
    }
    placed = replace(job, grid=dict(grid))
    for kind in _kinds(job, plan):
        reduction = _REDUCTIONS[kind](pipeline, placed)
        blocks = reduction.fanout()
        if blocks is None:
            continue
        for number in range(reduction.group_count(blocks)):
            under = reduction.batches_under(blocks, number, grid)
            batches = sorted({batch_of[tile] for tile in under})
            items.append({"reduce": kind, "group": number, "batches": batches})
    return items


def fanout_manifest_key(job: Job) -> str | None:
    """The key of the job's second fan-out items, or None when it has none."""
    return keys.fanout(job.job_id) if (job.grid or {}).get("fanout_items") else None


def reduce(
    pipeline: Pipeline, job_id: str, kind: str, number: int, batches: Sequence[int]
) -> dict[str, Any]:
    """Reduce group ``number`` of a pyramid's first coarse round from the pieces of the
    batches starting at ``batches``."""
    job = pipeline.jobs.get(job_id)
    if job.status in TERMINAL:
        return {"tiles": 0}
    reduction = _REDUCTIONS[kind](pipeline, job)
    blocks = reduction.fanout()
    if blocks is None:
        raise TilefanError(f"the {kind} pyramid of job {job_id} has no first round to fan out")
    store = pipeline.store
    indexes = store.get_json_all(keys.encoded(job_id, first, reduction.part) for first in batches)
    pieces = [piece for index in indexes for piece in Piece.listed(index)]
    try:
        with says_why(pipeline, job_id, f"level {blocks.level}, group {number}"):
            index = reduce_group(
                store, pieces, reduction, blocks, number, reduction.pixels(indexes[0])
            )
    finally:
        pipeline.discard_if_ended(job_id)
    return {"level": blocks.level, "group": number, "pieces": len(index.get("pieces", ()))}


@contextmanager
def says_why(pipeline: Pipeline, job_id: str, task: str) -> Iterator[None]:
    """Store why a fan-out ``task`` failed for good, for the abort: the Map reports only that
    an item failed. A transient error is left to the state machine's retries."""
    try:
        yield
    except TransientError:
        raise
    except TilefanError as e:
        pipeline.store.put_json(
            keys.fanout_failure(job_id), {"code": e.code, "message": f"{task}: {e}"}
        )
        raise


def _kinds(job: Job, plan: TilePlan) -> list[str]:
    """The pyramids a job's result has that may leave levels to reduce."""
    kinds = []
    if job.output_format == "tiff":
        kinds.append("tiff")
    if job.output_format in TILESET_FORMATS:
        kinds.append("set")
    # A preview is made of 8-bit results only (`TileSetBatchWriter.add`).
    if wants_preview(job.output_format, job.output_options) and plan.output.format == "uchar":
        kinds.append("preview")
    return kinds

"""Tile worker Lambda: run the chain on one manifest item's tiles."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from tilefan.stages.pipeline import Pipeline

logger = Logger()
pipeline = Pipeline.from_settings()


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Event: ``{"job_id": ..., "item": {"batch": n, "tiles": [[index, sx, sy, ...], ...]}}``.

    An item with ``upto`` belongs to a statistics pass: its tiles' partial statistics are stored.
    The second fan-out's items: ``{"batches": [first tile, ...]}``, a group of a COG's batches
    whose small levels are joined; ``{"reduce": kind, "group": n, "batches": [...]}``, a group
    of a pyramid's first coarse level, reduced from those batches' pieces.
    """
    # This invocation's keys only: the embedded engine runs invocations as threads of one process.
    logger.thread_safe_clear_keys()
    item, job_id = event["item"], event["job_id"]
    if "reduce" in item:
        logger.thread_safe_append_keys(job_id=job_id, reduce=item["reduce"], group=item["group"])
        return pipeline.reduce_group(job_id, item["reduce"], item["group"], item["batches"])
    if "batches" in item:
        logger.thread_safe_append_keys(job_id=job_id, batches=item["batches"][0])
        return pipeline.compact(job_id, item["batches"])
    logger.thread_safe_append_keys(job_id=job_id, batch=item["batch"])
    if "upto" in item:
        return pipeline.statistics_batch(job_id, item["upto"], item["batch"], item["tiles"])
    return pipeline.process_batch(job_id, item["tiles"])

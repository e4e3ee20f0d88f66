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
    ``{"job_id": ..., "batches": [first tile, ...]}`` is a group of a COG's batches whose small
    levels are joined (the second fan-out).
    """
    # This invocation's keys only: the embedded engine runs invocations as threads of one process.
    logger.thread_safe_clear_keys()
    if "batches" in event:
        logger.thread_safe_append_keys(job_id=event["job_id"], batches=event["batches"][0])
        return pipeline.compact(event["job_id"], event["batches"])
    item = event["item"]
    logger.thread_safe_append_keys(job_id=event["job_id"], batch=item["batch"])
    job_id = event["job_id"]
    if "upto" in item:
        return pipeline.statistics_batch(job_id, item["upto"], item["batch"], item["tiles"])
    return pipeline.process_batch(job_id, item["tiles"])

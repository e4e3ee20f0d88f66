"""Merger Lambda: assemble the output and finish the job, or abort it with its error."""

from __future__ import annotations

from typing import Any

import pyvips
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from tilefan.stages.pipeline import Pipeline

logger = Logger()
pipeline = Pipeline.from_settings()
# One pass over a huge image reuses nothing: libvips' operation cache would only hold memory
# (measured: the merger's peak at 100 MP falls from 326 MB to 164 MB without it).
pyvips.cache_set_max(0)


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Event: ``{"action": "merge" | "abort" | "reduce_statistics" | "cleanup", "job_id": ...}``.

    ``abort`` takes the ``error``; ``reduce_statistics`` the pass's ``manifest_key``. The state
    machine runs ``cleanup`` after a job succeeds; the API invokes it asynchronously when a
    job is cancelled or deleted.
    """
    # This invocation's keys only: the embedded engine runs invocations as threads of one process.
    logger.thread_safe_clear_keys()
    logger.thread_safe_append_keys(job_id=event["job_id"], action=event["action"])
    if event["action"] == "abort":
        return pipeline.abort(event["job_id"], event.get("error"))
    if event["action"] == "reduce_statistics":
        return pipeline.reduce_statistics(event["job_id"], event["manifest_key"])
    if event["action"] == "cleanup":
        return pipeline.cleanup(event["job_id"])
    return pipeline.merge(event["job_id"])

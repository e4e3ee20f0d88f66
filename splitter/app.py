"""Splitter Lambda: plan tiles from the upload's header (or transcode it), write the manifest."""

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
    """Event: ``{"job_id": ...}``; returns the manifest key and the tile and batch counts."""
    # This invocation's keys only: the embedded engine runs invocations as threads of one process.
    logger.thread_safe_clear_keys()
    logger.thread_safe_append_keys(job_id=event["job_id"])
    return pipeline.split(event["job_id"])

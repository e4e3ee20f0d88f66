"""Cleanup: remove what a job left once it ended: the state machine's last task after a
success, and off the API's request path for a cancelled or deleted job."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tilefan.errors import JobNotFound
from tilefan.state.multipart import abort_uploads
from tilefan.state.storage import keys

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline


def cleanup(pipeline: Pipeline, job_id: str) -> dict[str, Any]:
    """A deleted job loses every object and tile item; an ended one, what it ran with."""
    try:
        pipeline.jobs.get(job_id)
    except JobNotFound:
        removed = abort_uploads(pipeline.store, keys.result_prefix(job_id)) + sum(
            pipeline.store.delete_prefix(prefix)
            for prefix in (
                keys.job_prefix(job_id),
                keys.result_prefix(job_id),
                keys.upload_prefix(job_id),
            )
        )
        pipeline.jobs.delete(job_id)
        return {"removed": removed, "deleted": True}
    return {"removed": pipeline.discard_if_ended(job_id), "deleted": False}

"""Job life cycle shared by the REST API and the CLI: create, start, look at, cancel."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from tilefan.errors import TilefanError
from tilefan.jobs import TERMINAL, InvalidTransition, Job, JobRepository, JobStatus, TileProgress
from tilefan.operations import parse_chain
from tilefan.outputs import OUTPUT_FORMATS
from tilefan.plan import MAX_TILE_SIZE, MIN_TILE_SIZE
from tilefan.settings import Settings
from tilefan.storage import TileStore, keys

__all__ = ["InvalidRequest", "JobService", "JobView", "UploadMissing"]


class InvalidRequest(TilefanError):
    """A request field is missing or out of range; the message names the field."""

    code = "INVALID_REQUEST"


class UploadMissing(TilefanError):
    """The job was started before its upload arrived, or the upload has the wrong size."""

    code = "UPLOAD_MISSING"


@dataclass(frozen=True)
class JobView:
    """A job with its tile progress, as the status endpoint and the CLI show it."""

    job: Job
    progress: TileProgress | None


class JobService:
    """Creates and starts jobs; reads their state from the table, never from Step Functions."""

    def __init__(
        self,
        settings: Settings,
        *,
        jobs: JobRepository,
        store: TileStore,
        stepfunctions: Any,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.store = store
        self.stepfunctions = stepfunctions

    def create(
        self,
        owner: str,
        operations: Any,
        output_format: str,
        *,
        tile_size: int | None = None,
        output_options: Mapping[str, Any] | None = None,
        input_info: Mapping[str, Any] | None = None,
    ) -> Job:
        """Validate the request and create the job in CREATED."""
        chain = parse_chain(operations)
        if output_format not in OUTPUT_FORMATS:
            raise InvalidRequest(
                f"output.format: {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}"
            )
        size = tile_size if tile_size is not None else self.settings.tile_size
        if not MIN_TILE_SIZE <= size <= MAX_TILE_SIZE:
            raise InvalidRequest(
                f"tile_size: must be from {MIN_TILE_SIZE} to {MAX_TILE_SIZE} pixels, got {size}"
            )
        return self.jobs.new_job(
            owner=owner,
            operations=chain.to_json(),
            output_format=output_format,
            tile_size=size,
            input=input_info,
            output_options=output_options,
        )

    def start(self, owner: str, job_id: str, *, max_concurrency: int | None = None) -> Job:
        """Check the upload, queue the job and start its execution; a second start is refused."""
        job = self.jobs.get(job_id, owner=owner)
        uploaded = self.store.size(keys.upload(job_id))
        if uploaded is None:
            raise UploadMissing(f"nothing has been uploaded for job {job_id}")
        declared = job.input.get("size_bytes")
        if declared is not None and declared != uploaded:
            raise UploadMissing(f"the upload is {uploaded} bytes; the job declared {declared}")
        execution_input: dict[str, Any] = {"job_id": job_id}
        if max_concurrency is not None:
            execution_input["max_concurrency"] = max_concurrency
        self.jobs.transition(job_id, JobStatus.QUEUED, allowed_from={JobStatus.CREATED})
        try:
            execution = self.stepfunctions.start_execution(
                stateMachineArn=self.settings.state_machine_arn,
                name=job_id,
                input=json.dumps(execution_input),
            )
        except ClientError as e:
            self.jobs.finish_failed(job_id, "START_FAILED", "the pipeline could not be started")
            raise TilefanError("the pipeline could not be started") from e
        self.jobs.transition(
            job_id,
            JobStatus.QUEUED,
            allowed_from={JobStatus.QUEUED, JobStatus.SPLITTING},
            execution_arn=execution["executionArn"],
        )
        return self.jobs.get(job_id)

    def view(self, owner: str | None, job_id: str) -> JobView:
        """The job and, once split, its tile progress."""
        job = self.jobs.get(job_id, owner=owner)
        total = (job.grid or {}).get("tile_count")
        progress = self.jobs.progress(job_id, int(total)) if total else None
        return JobView(job, progress)

    def cancel(self, owner: str, job_id: str) -> Job:
        """Stop a running job (CANCELLED, intermediates removed); a finished one is left as is."""
        job = self.jobs.get(job_id, owner=owner)
        if job.status in TERMINAL:
            raise InvalidTransition(f"job {job_id} already ended {job.status.value}")
        self.jobs.transition(job_id, JobStatus.CANCELLED, allowed_from=set(JobStatus) - TERMINAL)
        if job.execution_arn:
            # It may have ended by itself meanwhile; the job is CANCELLED either way.
            with contextlib.suppress(ClientError):
                self.stepfunctions.stop_execution(
                    executionArn=job.execution_arn, cause="cancelled by its owner"
                )
        self.store.delete_prefix(keys.job_prefix(job_id))
        return self.jobs.get(job_id)

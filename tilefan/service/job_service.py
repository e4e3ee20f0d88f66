"""Job life cycle shared by the REST API and the CLI: create, start, look at, cancel."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from tilefan.errors import InvalidTileSize, TilefanError
from tilefan.formats.dz_tiles import TILESET_FORMATS, TileSetLayout
from tilefan.formats.output_limits import check_output_of_input
from tilefan.formats.outputs import OUTPUT_FORMATS
from tilefan.imaging.operations import parse_chain
from tilefan.imaging.plan import MAX_TILE_SIZE, MIN_TILE_SIZE
from tilefan.settings import Settings
from tilefan.state._transport import AWS_ERRORS
from tilefan.state.jobs import (
    TERMINAL,
    InvalidTransition,
    Job,
    JobRepository,
    JobStatus,
    TileProgress,
)
from tilefan.state.storage import TileStore, keys

__all__ = [
    "AlreadyStarted",
    "InputTooLarge",
    "InvalidRequest",
    "JobService",
    "JobView",
    "ResultNotReady",
    "UploadMismatch",
    "UploadMissing",
]

LOG = logging.getLogger(__name__)

_MAX_PARTS = 10_000
PARTS_AT_CREATION = 100
"""Part URLs signed with the job; the rest are signed on demand (`sign_parts`), shortly before
their upload, since every URL expires `presign_seconds` after it is signed."""
_SINGLE_PUT_LIMIT = 5 * 2**30


class InvalidRequest(TilefanError):
    """A request field is missing or out of range; the message names the field."""

    code = "INVALID_REQUEST"


class InputTooLarge(TilefanError):
    """The declared upload is larger than this deployment accepts."""

    code = "INPUT_TOO_LARGE"


class UploadMissing(TilefanError):
    """The job was started before its upload arrived."""

    code = "UPLOAD_MISSING"


class UploadMismatch(TilefanError):
    """The upload's size differs from the size the job declared, or its parts do not fit."""

    code = "UPLOAD_MISMATCH"


class AlreadyStarted(TilefanError):
    """The job was started before; it is never started twice."""

    code = "ALREADY_STARTED"


class ResultNotReady(TilefanError):
    """The job has not succeeded (yet), so there is no result to fetch."""

    code = "RESULT_NOT_READY"


@dataclass(frozen=True)
class JobView:
    """A job with its tile progress, as the status endpoint and the CLI show it."""

    job: Job
    progress: TileProgress | None
    passes: Mapping[int, TileProgress] = field(default_factory=dict)
    """Each statistics pass's progress, by the step it gathers statistics for."""

    def pass_under_way(self) -> tuple[Mapping[str, Any], TileProgress] | None:
        """While the job is in its statistics passes, the pass under way: its grid (rows,
        columns, tile count) and its progress; the last pass once all are done."""
        if self.job.status is not JobStatus.STATISTICS:
            return None
        grids = (self.job.grid or {}).get("passes", [])
        passes = [
            (grid, self.passes[grid["upto"]]) for grid in grids if grid["upto"] in self.passes
        ]
        for grid, progress in passes:
            if progress.done < progress.total:
                return grid, progress
        return passes[-1] if passes else None


class JobService:
    """Creates and starts jobs; reads their state from the table, never from Step Functions."""

    def __init__(
        self,
        settings: Settings,
        *,
        jobs: JobRepository,
        store: TileStore,
        stepfunctions: Any,
        functions: Any = None,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.store = store
        self.stepfunctions = stepfunctions
        self.functions = functions
        """A Lambda client: cancel and delete hand their bulk deletes to the cleanup function."""

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
        if output_format in TILESET_FORMATS:
            TileSetLayout.from_options(output_format, output_options or {})
        declared = int((input_info or {}).get("size_bytes", 0))
        if declared > self.settings.max_input_bytes:
            raise InputTooLarge(
                f"input.size_bytes: {declared:,} bytes is more than the "
                f"{self.settings.max_input_bytes:,} this deployment accepts"
            )
        width, height = (input_info or {}).get("width"), (input_info or {}).get("height")
        if width is not None and height is not None:
            check_output_of_input(
                chain,
                output_format,
                output_options or {},
                int(width),
                int(height),
                merger_timeout=self.settings.merger_timeout,
                merger_memory_mb=self.settings.merger_memory_mb,
            )
        size = tile_size if tile_size is not None else self.settings.tile_size
        if not MIN_TILE_SIZE <= size <= MAX_TILE_SIZE:
            raise InvalidTileSize(
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
        cap = self.settings.tile_worker_concurrency
        if max_concurrency is not None and not 1 <= max_concurrency <= cap:
            raise InvalidRequest(
                f"max_concurrency: must be from 1 to {cap}, the tile worker's reserved "
                f"concurrency, got {max_concurrency}"
            )
        job = self.jobs.get(job_id, owner=owner)
        uploaded = self.store.size(keys.upload(job_id))
        if uploaded is None:
            raise UploadMissing(f"nothing has been uploaded for job {job_id}")
        declared = job.input.get("size_bytes")
        if declared is not None and declared != uploaded:
            raise UploadMismatch(f"the upload is {uploaded:,} bytes; the job declared {declared:,}")
        execution_input: dict[str, Any] = {"job_id": job_id}
        if max_concurrency is not None:
            execution_input["max_concurrency"] = max_concurrency
        try:
            self.jobs.transition(job_id, JobStatus.QUEUED, allowed_from={JobStatus.CREATED})
        except InvalidTransition as e:
            raise AlreadyStarted(f"job {job_id} was already started") from e
        try:
            execution = self.stepfunctions.start_execution(
                stateMachineArn=self.settings.state_machine_arn,
                name=job_id,
                input=json.dumps(execution_input),
            )
        except ClientError as e:
            self.jobs.finish_failed(job_id, "START_FAILED", "the pipeline could not be started")
            raise TilefanError("the pipeline could not be started") from e
        # Not a transition: by now the splitter may have moved the job on, and setting QUEUED
        # again would make its next step (SPLITTING to PROCESSING) fail the job.
        self.jobs.record_execution(job_id, execution["executionArn"])
        return self.jobs.get(job_id)

    def view(self, owner: str | None, job_id: str) -> JobView:
        """The job and, once split, its tile progress and its statistics passes' (two reads)."""
        job = self.jobs.get(job_id, owner=owner)
        grid = job.grid or {}
        total = grid.get("tile_count")
        if not total:
            return JobView(job, None)
        passes = {int(p["upto"]): int(p["tile_count"]) for p in grid.get("passes", [])}
        progress, pass_progress = self.jobs.progress_with_passes(job_id, int(total), passes)
        return JobView(job, progress, pass_progress)

    def cancel(self, owner: str, job_id: str) -> Job:
        """Stop a running job (CANCELLED, intermediates removed); a finished one is left as is."""
        self._require_cleanup()
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
        self._clean_up_later(job_id)
        return self.jobs.get(job_id)

    # --- uploads and downloads ----------------------------------------------------------------

    def upload_instructions(self, job: Job) -> dict[str, Any]:
        """Presigned PUT for small uploads; presigned part PUTs for large ones."""
        size = int(job.input["size_bytes"])
        expires_at = self._expires_at()
        key = keys.upload(job.job_id)
        s3 = self.store.client
        if size <= min(self.settings.multipart_threshold, _SINGLE_PUT_LIMIT):
            content_type = str(job.input.get("content_type", "application/octet-stream"))
            # The signature covers the length, so S3 itself refuses a body of any other size
            # (an unsigned length would let a caller store up to 5 GB under a 10-byte job).
            url = s3.generate_presigned_url(
                "put_object",
                Params={
                    "Bucket": self.store.bucket,
                    "Key": key,
                    "ContentType": content_type,
                    "ContentLength": size,
                },
                ExpiresIn=self.settings.presign_seconds,
            )
            return {
                "upload": {
                    "method": "PUT",
                    "url": url,
                    "headers": {"Content-Type": content_type, "Content-Length": str(size)},
                    "expires_at": expires_at,
                }
            }
        part_size = max(self.settings.multipart_part_size, -(-size // _MAX_PARTS))
        upload_id = s3.create_multipart_upload(Bucket=self.store.bucket, Key=key)["UploadId"]
        self.jobs.transition(
            job.job_id,
            JobStatus.CREATED,
            allowed_from={JobStatus.CREATED},
            input={**job.input, "upload_id": upload_id, "part_size": part_size},
        )
        part_count = -(-size // part_size)
        first = range(1, min(part_count, PARTS_AT_CREATION) + 1)
        return {
            "multipart": {
                "part_size": part_size,
                "part_count": part_count,
                "parts": self._part_urls(job.job_id, upload_id, size, part_size, first),
                "expires_at": expires_at,
            }
        }

    def sign_parts(
        self, owner: str, job_id: str, part_numbers: list[int]
    ) -> tuple[list[dict[str, Any]], str]:
        """Fresh URLs for some parts of the job's multipart upload, and when they expire."""
        job = self.jobs.get(job_id, owner=owner)
        upload_id = job.input.get("upload_id")
        if job.status is not JobStatus.CREATED or not upload_id:
            raise UploadMismatch(f"job {job_id} has no multipart upload in progress")
        size, part_size = int(job.input["size_bytes"]), int(job.input["part_size"])
        part_count = -(-size // part_size)
        outside = sorted({n for n in part_numbers if not 1 <= n <= part_count})
        if outside:
            raise InvalidRequest(
                f"part_numbers: this upload has parts 1 to {part_count}, not {outside[0]}"
            )
        expires_at = self._expires_at()
        return self._part_urls(job_id, upload_id, size, part_size, part_numbers), expires_at

    def _part_urls(
        self, job_id: str, upload_id: str, size: int, part_size: int, numbers: Iterable[int]
    ) -> list[dict[str, Any]]:
        return [
            {
                "part_number": number,
                "url": self.store.client.generate_presigned_url(
                    "upload_part",
                    Params={
                        "Bucket": self.store.bucket,
                        "Key": keys.upload(job_id),
                        "UploadId": upload_id,
                        "PartNumber": number,
                        "ContentLength": min(part_size, size - (number - 1) * part_size),
                    },
                    ExpiresIn=self.settings.presign_seconds,
                ),
            }
            for number in numbers
        ]

    def complete_upload(self, owner: str, job_id: str, parts: list[dict[str, Any]]) -> None:
        """Finish a multipart upload from the parts' ETags."""
        job = self.jobs.get(job_id, owner=owner)
        upload_id = job.input.get("upload_id")
        if job.status is not JobStatus.CREATED or not upload_id:
            raise UploadMismatch(f"job {job_id} has no multipart upload in progress")
        try:
            self.store.client.complete_multipart_upload(
                Bucket=self.store.bucket,
                Key=keys.upload(job_id),
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [
                        {"PartNumber": part["part_number"], "ETag": part["etag"]}
                        for part in sorted(parts, key=lambda p: int(p["part_number"]))
                    ]
                },
            )
        except ClientError as e:
            reason = e.response.get("Error", {}).get("Message", "S3 refused the parts")
            raise UploadMismatch(f"the upload could not be completed: {reason}") from e

    def result_url(self, owner: str, job_id: str) -> tuple[str, str]:
        """A presigned download URL of the result and when it expires."""
        job = self.jobs.get(job_id, owner=owner)
        if job.status is not JobStatus.SUCCEEDED or not job.output:
            raise ResultNotReady(f"job {job_id} is {job.status.value}; it has no result yet")
        url = self.store.client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.store.bucket,
                "Key": job.output["key"],
                "ResponseContentDisposition": (
                    f'attachment; filename="{job_id}.{job.output["key"].rsplit(".", 1)[-1]}"'
                ),
            },
            ExpiresIn=self.settings.presign_seconds,
        )
        return url, self._expires_at()

    def delete(self, owner: str, job_id: str) -> Job | None:
        """Cancel a running job (returned), or delete an ended one with its objects (None)."""
        self._require_cleanup()
        job = self.jobs.get(job_id, owner=owner)
        if job.status not in TERMINAL and job.status is not JobStatus.CREATED:
            return self.cancel(owner, job_id)
        if job.input.get("upload_id") and job.status is JobStatus.CREATED:
            with contextlib.suppress(ClientError):
                self.store.client.abort_multipart_upload(
                    Bucket=self.store.bucket,
                    Key=keys.upload(job_id),
                    UploadId=job.input["upload_id"],
                )
        self.jobs.forget(job_id)
        self._clean_up_later(job_id)
        return None

    def _require_cleanup(self) -> None:
        """Refuse to cancel or delete, before changing anything, without a cleanup function."""
        if not self.settings.cleanup_function or self.functions is None:
            raise TilefanError("no cleanup function is configured (TILEFAN_CLEANUP_FUNCTION)")

    def _clean_up_later(self, job_id: str) -> None:
        """Have the cleanup function remove the job's objects and tile items, off this request.

        A job has up to 20,000 tiles and as many objects: deleting them here could outlast API
        Gateway's 29 s. Lambda retries a failed asynchronous invocation twice; what is still
        left expires by the bucket's lifecycle rules and the table's TTL.
        """
        try:
            self.functions.invoke(
                FunctionName=self.settings.cleanup_function,
                InvocationType="Event",
                Payload=json.dumps({"action": "cleanup", "job_id": job_id}).encode(),
            )
        except AWS_ERRORS:
            LOG.warning("could not start the cleanup of job %s; lifecycle rules will", job_id)

    def _expires_at(self) -> str:
        moment = datetime.now(UTC) + timedelta(seconds=self.settings.presign_seconds)
        return moment.isoformat(timespec="seconds")

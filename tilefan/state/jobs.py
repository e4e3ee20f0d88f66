"""Job and tile state in DynamoDB, behind a narrow repository.

One job item holds the job; one small item per tile holds that tile's state. Counts and the tile
grid are derived from the tile items, so there is no shared counter to make a hot key, and a
duplicated delivery that writes DONE twice cannot count twice. Tile items are spread over
``TILE_SHARDS`` partition keys so thousands of workers do not write one partition.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import boto3
from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import BotoCoreError, ClientError

from tilefan.errors import JobNotFound, TilefanError, TransientError
from tilefan.state._transport import AWS_ERRORS, translate_transport

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

__all__ = [
    "MAX_TILES",
    "TERMINAL",
    "TILE_SHARDS",
    "InvalidCursor",
    "InvalidTransition",
    "Job",
    "JobRepository",
    "JobStatus",
    "TileProgress",
    "TileRecord",
    "TileState",
]

LOG = logging.getLogger(__name__)

TILE_SHARDS = 8
MAX_TILES = 20_000
"""The most tiles one job may have: the status endpoint reads every tile item on a poll
(20,000 items of about 40 bytes is 800 KB, a few paginated queries), and the progress grid
stays under 20 KB."""


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    CREATED = "CREATED"
    QUEUED = "QUEUED"
    SPLITTING = "SPLITTING"
    PROCESSING = "PROCESSING"
    MERGING = "MERGING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class TileState(enum.StrEnum):
    """Where a tile is; the one-letter codes draw the progress grid."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"

    @property
    def letter(self) -> str:
        """The grid letter: P, R, D or F."""
        return self.value[0]


class InvalidCursor(TilefanError):
    """A page cursor that this API did not give out."""

    code = "INVALID_REQUEST"


class InvalidTransition(TilefanError):
    """The job is not in a state that allows this step (for example, it was cancelled)."""

    code = "INVALID_STATE"


@dataclass
class Job:
    """A job as the API and the pipeline see it."""

    job_id: str
    owner: str
    status: JobStatus
    operations: list[dict[str, Any]]
    output_format: str
    tile_size: int
    created_at: str
    input: dict[str, Any] = field(default_factory=dict)
    output_options: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    output: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    execution_arn: str | None = None
    updated_at: str = ""


@dataclass(frozen=True)
class TileRecord:
    """One tile's state."""

    index: int
    state: TileState
    attempts: int
    duration_ms: int | None
    error: str | None


@dataclass(frozen=True)
class TileProgress:
    """Counts by state and the state of every tile as a row-major string of letters."""

    total: int
    counts: Mapping[TileState, int]
    grid: str

    @property
    def done(self) -> int:
        """Tiles finished."""
        return self.counts.get(TileState.DONE, 0)

    @property
    def failed(self) -> int:
        """Tiles that failed for good."""
        return self.counts.get(TileState.FAILED, 0)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _job_key(job_id: str) -> dict[str, str]:
    return {"pk": f"JOB#{job_id}", "sk": "JOB"}


def _tile_key(job_id: str, index: int) -> dict[str, str]:
    return {"pk": f"JOB#{job_id}#S{index % TILE_SHARDS}", "sk": f"TILE#{index:06d}"}


_JSON_FIELDS = ("operations", "input", "output_options", "source", "grid", "output", "error")


def _to_item(job: Job, ttl_days: int) -> dict[str, Any]:
    item: dict[str, Any] = {
        **_job_key(job.job_id),
        "job_id": job.job_id,
        "owner": job.owner,
        "status": job.status.value,
        "output_format": job.output_format,
        "tile_size": job.tile_size,
        "created_at": job.created_at,
        "updated_at": job.created_at,
        "gsi1pk": f"OWNER#{job.owner}",
        "gsi1sk": f"{job.created_at}#{job.job_id}",
        "expires_at": int(time.time()) + ttl_days * 86_400,
    }
    for name in _JSON_FIELDS:
        item[name] = json.dumps(getattr(job, name))
    return item


def _from_item(item: Mapping[str, Any]) -> Job:
    timings = {
        name.removeprefix("t_"): float(value)
        for name, value in item.items()
        if name.startswith("t_")
    }
    return Job(
        job_id=str(item["job_id"]),
        owner=str(item["owner"]),
        status=JobStatus(item["status"]),
        output_format=str(item["output_format"]),
        tile_size=int(item["tile_size"]),
        created_at=str(item["created_at"]),
        updated_at=str(item.get("updated_at", "")),
        timings=timings,
        execution_arn=item.get("execution_arn"),
        **{name: json.loads(item[name]) for name in _JSON_FIELDS if name in item},
    )


_CURSOR_KEYS = frozenset({"pk", "sk", "gsi1pk", "gsi1sk"})


def _encode_cursor(key: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(
        json.dumps({k: str(v) for k, v in key.items()}).encode()
    ).decode()


def _decode_cursor(cursor: str, owner_key: str) -> dict[str, str]:
    """The page key inside a cursor we gave out, or `InvalidCursor`; never another owner's."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except ValueError as e:
        raise InvalidCursor("cursor: not a cursor this API gave out") from e
    if (
        not isinstance(key, dict)
        or set(key) != _CURSOR_KEYS
        or not all(isinstance(value, str) for value in key.values())
        or key["gsi1pk"] != owner_key
    ):
        raise InvalidCursor("cursor: not a cursor this API gave out")
    return key


def _is_condition_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def _translate(error: ClientError | BotoCoreError) -> TilefanError:
    if isinstance(error, BotoCoreError):
        return translate_transport(error, "the job table")
    code = error.response.get("Error", {}).get("Code", "")
    if code in (
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "ServiceUnavailable",
        "TransactionConflictException",
    ):
        return TransientError(f"the job table was busy ({code})")
    return TilefanError(f"the job table refused the request ({code})")


class JobRepository:
    """Reads and writes jobs and tiles in one DynamoDB table keyed by ``pk`` and ``sk``."""

    def __init__(self, table_name: str, *, resource: Any = None, ttl_days: int = 30) -> None:
        self.table: Table = (resource or boto3.resource("dynamodb")).Table(table_name)
        self.ttl_days = ttl_days

    # --- jobs ---------------------------------------------------------------------------------

    def new_job(
        self,
        *,
        owner: str,
        operations: list[dict[str, Any]],
        output_format: str,
        tile_size: int,
        input: Mapping[str, Any] | None = None,
        output_options: Mapping[str, Any] | None = None,
    ) -> Job:
        """Create a job in CREATED with a fresh id."""
        job = Job(
            job_id=uuid.uuid4().hex,
            owner=owner,
            status=JobStatus.CREATED,
            operations=operations,
            output_format=output_format,
            tile_size=tile_size,
            created_at=_now(),
            input=dict(input or {}),
            output_options=dict(output_options or {}),
        )
        try:
            self.table.put_item(
                Item=_to_item(job, self.ttl_days), ConditionExpression=Attr("pk").not_exists()
            )
        except AWS_ERRORS as e:
            raise _translate(e) from e
        return job

    def get(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job, or `JobNotFound`; with ``owner``, another caller's job is not found either."""
        try:
            item = self.table.get_item(Key=_job_key(job_id), ConsistentRead=True).get("Item")
        except AWS_ERRORS as e:
            raise _translate(e) from e
        if item is None or (owner is not None and item["owner"] != owner):
            raise JobNotFound(f"no job {job_id}")
        return _from_item(item)

    def list_for_owner(
        self, owner: str, *, limit: int, after: str | None = None
    ) -> tuple[list[Job], str | None]:
        """The owner's jobs, newest first, and a cursor for the next page."""
        query: dict[str, Any] = {
            "IndexName": "owner-created",
            "KeyConditionExpression": Key("gsi1pk").eq(f"OWNER#{owner}"),
            "ScanIndexForward": False,
            "Limit": limit,
        }
        if after:
            query["ExclusiveStartKey"] = _decode_cursor(after, f"OWNER#{owner}")
        try:
            page = self.table.query(**query)
        except AWS_ERRORS as e:
            raise _translate(e) from e
        jobs = [self.get(str(item["pk"]).removeprefix("JOB#")) for item in page.get("Items", [])]
        cursor = page.get("LastEvaluatedKey")
        return jobs, _encode_cursor(cursor) if cursor else None

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        allowed_from: Iterable[JobStatus],
        **fields: Any,
    ) -> None:
        """Move the job to ``to`` if it is in one of ``allowed_from``, setting ``fields`` too.

        Fields named ``t_<stage>`` are stage timings in seconds; others are stored as JSON.
        """
        names = {"#status": "status", "#updated": "updated_at"}
        values: dict[str, Any] = {":to": to.value, ":now": _now()}
        sets = ["#status = :to", "#updated = :now"]
        for number, (name, value) in enumerate(fields.items()):
            names[f"#f{number}"] = name
            sets.append(f"#f{number} = :f{number}")
            if name.startswith("t_"):
                values[f":f{number}"] = Decimal(str(round(value, 3)))
            elif name == "execution_arn":
                values[f":f{number}"] = value
            else:
                values[f":f{number}"] = json.dumps(value)
        allowed = [status.value for status in allowed_from]
        for number, status in enumerate(allowed):
            values[f":a{number}"] = status
        condition = "#status IN (" + ", ".join(f":a{n}" for n in range(len(allowed))) + ")"
        try:
            self.table.update_item(
                Key=_job_key(job_id),
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as e:
            if _is_condition_failure(e):
                current = self.get(job_id).status
                raise InvalidTransition(
                    f"job {job_id} is {current.value}; it cannot become {to.value}"
                ) from e
            raise _translate(e) from e
        except BotoCoreError as e:
            raise _translate(e) from e

    def record_execution(self, job_id: str, execution_arn: str) -> None:
        """Note the job's execution, leaving its status (the pipeline may have moved it on)."""
        try:
            self.table.update_item(
                Key=_job_key(job_id),
                UpdateExpression="SET execution_arn = :arn",
                ConditionExpression=Attr("pk").exists(),
                ExpressionAttributeValues={":arn": execution_arn},
            )
        except AWS_ERRORS as e:
            raise _translate(e) from e

    def finish_failed(self, job_id: str, code: str, message: str) -> bool:
        """Mark the job FAILED unless it already ended; returns whether this call ended it."""
        try:
            self.transition(
                job_id,
                JobStatus.FAILED,
                allowed_from=set(JobStatus) - TERMINAL,
                error={"code": code, "message": message},
            )
        except InvalidTransition:
            return False
        return True

    def forget(self, job_id: str) -> None:
        """Remove the job item only: the job is gone for its owner; its tiles go later."""
        try:
            self.table.delete_item(Key=_job_key(job_id))
        except AWS_ERRORS as e:
            raise _translate(e) from e

    def delete(self, job_id: str) -> None:
        """Remove the job item and its tile items."""
        try:
            with self.table.batch_writer() as batch:
                for record in self.tiles(job_id):
                    batch.delete_item(Key=_tile_key(job_id, record.index))
                batch.delete_item(Key=_job_key(job_id))
        except AWS_ERRORS as e:
            raise _translate(e) from e

    # --- tiles --------------------------------------------------------------------------------

    def create_tiles(self, job_id: str, count: int) -> None:
        """One PENDING item per tile (rewritten as PENDING if the splitter runs again)."""
        try:
            with self.table.batch_writer() as batch:
                for index in range(count):
                    batch.put_item(
                        Item={
                            **_tile_key(job_id, index),
                            "st": TileState.PENDING.value,
                            "at": 0,
                            "expires_at": int(time.time()) + self.ttl_days * 86_400,
                        }
                    )
        except AWS_ERRORS as e:
            raise _translate(e) from e

    def tile_started(self, job_id: str, index: int) -> bool:
        """Count an attempt and mark RUNNING; False if the tile is already DONE (a duplicate)."""
        try:
            self.table.update_item(
                Key=_tile_key(job_id, index),
                UpdateExpression="SET st = :running ADD #at :one",
                ConditionExpression=Attr("st").ne(TileState.DONE.value),
                ExpressionAttributeNames={"#at": "at"},
                ExpressionAttributeValues={":running": TileState.RUNNING.value, ":one": 1},
            )
        except ClientError as e:
            if _is_condition_failure(e):
                return False
            raise _translate(e) from e
        except BotoCoreError as e:
            raise _translate(e) from e
        return True

    def tile_finished(
        self, job_id: str, index: int, duration_ms: int, error: str | None = None
    ) -> None:
        """Mark the tile DONE, or FAILED with ``error``."""
        state = TileState.FAILED if error else TileState.DONE
        values: dict[str, Any] = {":st": state.value, ":ms": duration_ms}
        update = "SET st = :st, ms = :ms"
        if error:
            update += ", er = :er"
            values[":er"] = error[:500]
        else:
            update += " REMOVE er"  # an error an earlier, retried attempt left
        try:
            self.table.update_item(
                Key=_tile_key(job_id, index),
                UpdateExpression=update,
                ExpressionAttributeValues=values,
            )
        except AWS_ERRORS as e:
            raise _translate(e) from e

    def tile_retrying(self, job_id: str, index: int, error: str) -> None:
        """Note a retryable error on a RUNNING tile, leaving it RUNNING.

        Best effort: the error being retried may be this table's own throttling.
        """
        try:
            self.table.update_item(
                Key=_tile_key(job_id, index),
                UpdateExpression="SET er = :er",
                ConditionExpression=Attr("st").eq(TileState.RUNNING.value),
                ExpressionAttributeValues={":er": error[:500]},
            )
        except AWS_ERRORS:
            LOG.warning("could not note the retried error of tile %s of job %s", index, job_id)

    def tiles(self, job_id: str) -> Iterator[TileRecord]:
        """Every tile record of the job, in no particular order."""
        for shard in range(TILE_SHARDS):
            # Strongly consistent: the merge's all-done check and Abort's failing tile read
            # tiles that workers have just written, and a Query is eventually consistent
            # unless asked.
            query: dict[str, Any] = {
                "KeyConditionExpression": Key("pk").eq(f"JOB#{job_id}#S{shard}"),
                "ConsistentRead": True,
            }
            while True:
                try:
                    page = self.table.query(**query)
                except AWS_ERRORS as e:
                    raise _translate(e) from e
                for item in page.get("Items", []):
                    yield TileRecord(
                        index=int(str(item["sk"]).removeprefix("TILE#")),
                        state=TileState(str(item["st"])),
                        attempts=int(str(item.get("at", 0))),
                        duration_ms=int(str(item["ms"])) if "ms" in item else None,
                        error=str(item["er"]) if "er" in item else None,
                    )
                if "LastEvaluatedKey" not in page:
                    break
                query["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def progress(self, job_id: str, total: int) -> TileProgress:
        """Counts by state and the row-major grid of every tile's state letter."""
        letters = [TileState.PENDING.letter] * total
        counts: Counter[TileState] = Counter()
        for record in self.tiles(job_id):
            if record.index < total:
                letters[record.index] = record.state.letter
                counts[record.state] += 1
        counts[TileState.PENDING] += total - sum(counts.values())
        return TileProgress(total=total, counts=dict(counts), grid="".join(letters))

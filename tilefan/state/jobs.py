"""Job and tile state in DynamoDB, behind a narrow repository.

One job item holds the job. The tiles' states live in at most `BANDS` band items, each its own
partition key, holding per tile a state letter, an attempt count, a duration and (for a failed
or retried tile) an error. Tiles are dealt to the bands in stripes of `STRIPE_TILES` consecutive
tiles, so a default batch falls in one band and the batches running at once are spread over all
of them. A status read fetches every band in one BatchGetItem whatever the job's size; a worker
writes each band its batch touches twice (started, finished), setting list elements by position,
so concurrent workers in one band never overwrite each other. Counts are derived from the
letters, so a duplicated delivery that writes DONE twice cannot count twice, and no counter item
becomes a hot key.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import boto3
from boto3.dynamodb.conditions import Attr, Key
from boto3.dynamodb.types import TypeDeserializer
from botocore.exceptions import BotoCoreError, ClientError

from tilefan.errors import JobNotFound, TilefanError, TransientError
from tilefan.state._transport import AWS_ERRORS, translate_transport

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import DynamoDBServiceResource, Table

__all__ = [
    "BANDS",
    "MAX_TILES",
    "STRIPE_TILES",
    "TERMINAL",
    "InvalidCursor",
    "InvalidTransition",
    "Job",
    "JobRepository",
    "JobStatus",
    "TileOutcome",
    "TileProgress",
    "TileRecord",
    "TileState",
]

LOG = logging.getLogger(__name__)

BANDS = 100
"""Band items per job at most: DynamoDB's most keys in one BatchGetItem, so a status read is
one GetItem of the job and one BatchGetItem of its bands, for every job size."""

STRIPE_TILES = 4
"""Consecutive tiles dealt to one band: the default batch (``TILEFAN_TILES_PER_ITEM``) writes
one band, and the ~1,000 batches running at once are spread over all `BANDS` (docs/design.md,
Job state, has the arithmetic)."""

MAX_TILES = 20_000
"""The most tiles one job may have: 200 tiles per band item (about 2 KB, two write units per
write, one read unit per strongly consistent read) and a progress grid of 20 KB in the status
document."""

_BATCH_GET_ROUNDS = 5
"""Rounds of a BatchGetItem's unprocessed keys before the read counts as throttled."""

_TILES_PER_WRITE = 40
"""Tiles in one band update, so its expressions stay inside DynamoDB's 4 KB."""

_CONDITION_ROUNDS = 4
"""Writes of one band update whose per-tile condition failed before giving up."""

_DESERIALIZER = TypeDeserializer()


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    CREATED = "CREATED"
    QUEUED = "QUEUED"
    SPLITTING = "SPLITTING"
    STATISTICS = "STATISTICS"
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
class TileOutcome:
    """What one attempt at a tile came to: DONE, FAILED, RUNNING with a retryable error, or
    PENDING for a tile its batch started but never reached (its attempt is taken back)."""

    index: int
    state: TileState
    duration_ms: int
    error: str | None = None


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


def _band_key(job_id: str, band: int) -> dict[str, str]:
    return {"pk": f"JOB#{job_id}#B{band:03d}", "sk": "BAND"}


def _band_count(total: int) -> int:
    return min(BANDS, -(-total // STRIPE_TILES))


def _band(index: int) -> int:
    return (index // STRIPE_TILES) % BANDS


def _offset(index: int) -> int:
    """The tile's position in its band's lists."""
    return (index // STRIPE_TILES // BANDS) * STRIPE_TILES + index % STRIPE_TILES


def _index(band: int, offset: int) -> int:
    """The tile at ``offset`` in ``band``: the inverse of `_band` and `_offset`."""
    return ((offset // STRIPE_TILES) * BANDS + band) * STRIPE_TILES + offset % STRIPE_TILES


def _by_band(indices: Iterable[int]) -> dict[int, list[int]]:
    bands: dict[int, list[int]] = {}
    for index in indices:
        bands.setdefault(_band(index), []).append(index)
    return bands


_Entry = Any
"""A tile index (a started write) or a `TileOutcome` (a finished write)."""

_BY_LETTER = {state.letter: state for state in TileState}


@dataclass(frozen=True)
class _BandWrite:
    """One UpdateItem of a band item, and which entries its per-tile condition lets through."""

    expression: str
    condition: str
    names: dict[str, str]
    values: dict[str, Any]
    allows: Callable[[_Entry, Mapping[str, Any]], bool]


def _letter(item: Mapping[str, Any], index: int) -> str:
    return str(item["g"][_offset(index)])


def _start_write(indices: Sequence[int]) -> _BandWrite:
    """Every tile RUNNING with one more attempt, unless one is DONE already."""
    offsets = [_offset(index) for index in indices]
    return _BandWrite(
        expression="SET "
        + ", ".join(f"g[{o}] = :running, a[{o}] = a[{o}] + :one" for o in offsets),
        condition=" AND ".join(["attribute_exists(g)"] + [f"g[{o}] <> :done" for o in offsets]),
        names={},
        values={
            ":running": TileState.RUNNING.letter,
            ":one": 1,
            ":done": TileState.DONE.letter,
        },
        allows=lambda index, item: _letter(item, index) != TileState.DONE.letter,
    )


def _finish_write(outcomes: Sequence[TileOutcome]) -> _BandWrite:
    """Each tile's outcome, its duration, and its error (or no error once DONE)."""
    sets: list[str] = []
    removes: list[str] = []
    conditions = ["attribute_exists(g)"]
    names: dict[str, str] = {}
    values: dict[str, Any] = {}
    for number, outcome in enumerate(outcomes):
        offset, error = _offset(outcome.index), f"#e{number}"
        if outcome.state is TileState.PENDING:
            conditions.append(f"g[{offset}] = :running")
            sets += [f"g[{offset}] = :pending", f"a[{offset}] = a[{offset}] - :one"]
            values[":one"] = 1
            continue
        names[error] = str(outcome.index)
        if outcome.state is TileState.RUNNING:
            conditions.append(f"g[{offset}] = :running")
        else:
            values[f":ms{number}"] = outcome.duration_ms
            sets += [f"g[{offset}] = :{outcome.state.value.lower()}", f"ms[{offset}] = :ms{number}"]
        if outcome.state is TileState.FAILED:
            conditions.append(f"g[{offset}] <> :done")
        if outcome.state is TileState.DONE:
            removes.append(f"e.{error}")  # an error an earlier, retried attempt left
        else:
            values[f":er{number}"] = (outcome.error or "")[:500]
            sets.append(f"e.{error} = :er{number}")
    for state in TileState:
        placeholder = f":{state.value.lower()}"
        if any(placeholder in text for text in (*sets, *conditions)):
            values[placeholder] = state.letter
    expression = "SET " + ", ".join(sets)
    if removes:
        expression += " REMOVE " + ", ".join(removes)
    return _BandWrite(
        expression=expression,
        condition=" AND ".join(conditions),
        names=names,
        values=values,
        allows=_finish_allows,
    )


def _finish_allows(outcome: TileOutcome, item: Mapping[str, Any]) -> bool:
    letter = _letter(item, outcome.index)
    if outcome.state is TileState.FAILED:
        return letter != TileState.DONE.letter
    if outcome.state in (TileState.RUNNING, TileState.PENDING):
        return letter == TileState.RUNNING.letter
    return True


def _band_records(band: int, item: Mapping[str, Any]) -> list[TileRecord]:
    errors: Mapping[str, Any] = item.get("e", {})
    return [
        TileRecord(
            index=index,
            state=_BY_LETTER[str(letter)],
            attempts=int(item["a"][offset]),
            duration_ms=None if item["ms"][offset] is None else int(item["ms"][offset]),
            error=str(errors[str(index)]) if str(index) in errors else None,
        )
        for offset, letter in enumerate(item["g"])
        for index in (_index(band, offset),)
    ]


def _pass_letters(upto: int) -> str:
    """The band items' attribute holding the letters of the statistics pass before ``upto``."""
    return f"s{upto}"


def _progress(bands: Mapping[int, Mapping[str, Any]], attribute: str, total: int) -> TileProgress:
    """Counts and the row-major grid of the letters in ``attribute`` of every band item."""
    letters = [TileState.PENDING.letter] * total  # as are bands not written yet
    for band, item in bands.items():
        for offset, letter in enumerate(item.get(attribute, [])):
            letters[_index(band, offset)] = str(letter)
    grid = "".join(letters)
    counts = {state: grid.count(state.letter) for state in TileState}
    return TileProgress(
        total=total, counts={state: n for state, n in counts.items() if n}, grid=grid
    )


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
        self.resource: DynamoDBServiceResource = resource or boto3.resource("dynamodb")
        self.table: Table = self.resource.Table(table_name)
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
        """Remove the job item and its band items (every band a job can have: the job item,
        which knows its tile count, may already be gone)."""
        try:
            with self.table.batch_writer() as batch:
                for band in range(BANDS):
                    batch.delete_item(Key=_band_key(job_id, band))
                batch.delete_item(Key=_job_key(job_id))
        except AWS_ERRORS as e:
            raise _translate(e) from e

    # --- tiles --------------------------------------------------------------------------------

    def create_tiles(self, job_id: str, count: int) -> None:
        """Every tile PENDING, in the band items (reset if the splitter runs again)."""
        expires_at = int(time.time()) + self.ttl_days * 86_400
        sizes = Counter(_band(index) for index in range(count))
        try:
            with self.table.batch_writer() as batch:
                for band, size in sizes.items():
                    batch.put_item(
                        Item={
                            **_band_key(job_id, band),
                            "g": [TileState.PENDING.letter] * size,
                            "a": [0] * size,
                            "ms": [None] * size,
                            "e": {},
                            "expires_at": expires_at,
                        }
                    )
        except AWS_ERRORS as e:
            raise _translate(e) from e

    def tiles_started(self, job_id: str, indices: Iterable[int]) -> list[int]:
        """Mark the tiles RUNNING and count an attempt on each, one write per band touched.

        Returns the tiles to process: a tile already DONE (a retried or duplicated delivery)
        is left as it is and left out.
        """
        started: list[int] = []
        for band, tiles in _by_band(sorted(set(indices))).items():
            started += self._update_band(job_id, band, tiles, _start_write)
        return started

    def tiles_finished(self, job_id: str, outcomes: Iterable[TileOutcome]) -> None:
        """Record what a batch's tiles came to, one write per band touched.

        DONE always holds; FAILED never replaces a DONE a duplicate delivery recorded; an
        outcome still RUNNING notes a retryable error, and PENDING puts back a tile the batch
        never reached, both only on a tile still RUNNING.
        """
        by_index = {outcome.index: outcome for outcome in outcomes}
        for band, tiles in _by_band(sorted(by_index)).items():
            self._update_band(job_id, band, [by_index[index] for index in tiles], _finish_write)

    def tiles(self, job_id: str, total: int, *, consistent: bool = False) -> list[TileRecord]:
        """Every tile record of the job, by index, read from its band items."""
        bands = self._read_bands(job_id, total, consistent=consistent)
        records = [record for band, item in bands.items() for record in _band_records(band, item)]
        return sorted(records, key=lambda record: record.index)

    def progress(self, job_id: str, total: int, *, consistent: bool = False) -> TileProgress:
        """Counts by state and the row-major grid of every tile's state letter.

        Two requests whatever the job's size or state (the job's, then its bands');
        ``consistent`` for a read that decides something, such as the merger's.
        """
        progress, _ = self.progress_with_passes(job_id, total, {}, consistent=consistent)
        return progress

    def progress_with_passes(
        self,
        job_id: str,
        total: int,
        passes: Mapping[int, int],
        *,
        consistent: bool = False,
    ) -> tuple[TileProgress, dict[int, TileProgress]]:
        """The tiles' progress and each statistics pass's (``passes``: tile count by ``upto``),
        from the same band items in the same one BatchGetItem."""
        attributes = ["g", *(_pass_letters(upto) for upto in passes)]
        bands = self._read_bands(
            job_id,
            max([total, *passes.values()]),
            consistent=consistent,
            attributes=", ".join(attributes),
        )
        tiles = _progress(bands, "g", total)
        return tiles, {upto: _progress(bands, _pass_letters(upto), n) for upto, n in passes.items()}

    # --- statistics passes --------------------------------------------------------------------

    def create_pass_tiles(self, job_id: str, passes: Mapping[int, int]) -> None:
        """Every statistics pass's tiles PENDING (``passes``: tile count by ``upto``), in the
        band items beside the tiles' (after `create_tiles`, which replaces the band items)."""
        expires_at = int(time.time()) + self.ttl_days * 86_400
        sizes = {upto: Counter(_band(index) for index in range(n)) for upto, n in passes.items()}
        for band in range(_band_count(max(passes.values(), default=0))):
            names = {f"#s{upto}": _pass_letters(upto) for upto in passes}
            values: dict[str, Any] = {":expires": expires_at}
            for upto, counts in sizes.items():
                values[f":s{upto}"] = [TileState.PENDING.letter] * counts[band]
            try:
                self.table.update_item(
                    Key=_band_key(job_id, band),
                    UpdateExpression="SET expires_at = if_not_exists(expires_at, :expires), "
                    + ", ".join(f"#s{upto} = :s{upto}" for upto in passes),
                    ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values,
                )
            except AWS_ERRORS as e:
                raise _translate(e) from e

    def pass_tiles_done(self, job_id: str, upto: int, indices: Iterable[int]) -> None:
        """Mark a statistics pass's tiles DONE, one write per band touched.

        A pass tile has no attempts or errors to keep (a failed one fails the job), so a write
        sets letters only; writing DONE again, on a duplicated delivery, changes nothing.
        """
        for band, tiles in _by_band(sorted(set(indices))).items():
            for start in range(0, len(tiles), _TILES_PER_WRITE):
                offsets = [_offset(index) for index in tiles[start : start + _TILES_PER_WRITE]]
                try:
                    self.table.update_item(
                        Key=_band_key(job_id, band),
                        UpdateExpression="SET "
                        + ", ".join(f"#s[{offset}] = :done" for offset in offsets),
                        ConditionExpression="attribute_exists(#s)",
                        ExpressionAttributeNames={"#s": _pass_letters(upto)},
                        ExpressionAttributeValues={":done": TileState.DONE.letter},
                    )
                except ClientError as e:
                    if _is_condition_failure(e):
                        return  # the job's records were deleted: nothing left to show
                    raise _translate(e) from e
                except BotoCoreError as e:
                    raise _translate(e) from e

    def _read_bands(
        self, job_id: str, total: int, *, consistent: bool, attributes: str | None = None
    ) -> dict[int, dict[str, Any]]:
        """The job's band items by band (missing ones left out), in one BatchGetItem."""
        bands = {_band_key(job_id, band)["pk"]: band for band in range(_band_count(total))}
        request: Any = {
            "Keys": [{"pk": pk, "sk": "BAND"} for pk in bands],
            "ConsistentRead": consistent,
        }
        if attributes:
            request["ProjectionExpression"] = f"pk, {attributes}"
        found: dict[int, dict[str, Any]] = {}
        for _ in range(_BATCH_GET_ROUNDS):
            if not bands:
                return found
            try:
                answer = self.resource.batch_get_item(RequestItems={self.table.name: request})
            except AWS_ERRORS as e:
                raise _translate(e) from e
            for item in answer.get("Responses", {}).get(self.table.name, []):
                found[bands[str(item["pk"])]] = item
            request = answer.get("UnprocessedKeys", {}).get(self.table.name)
            if not request:
                return found
            time.sleep(0.05)  # DynamoDB left some keys unread (throttled): read them again
        raise TransientError("the job table was busy (band reads left unprocessed)")

    def _update_band(
        self,
        job_id: str,
        band: int,
        entries: Sequence[_Entry],
        write: Callable[[Sequence[_Entry]], _BandWrite],
    ) -> list[_Entry]:
        """Apply ``write`` to one band item; the entries its condition allowed.

        The condition is per tile (``g[3] <> :done``), so when it fails the band as it now is
        says which entries to drop, and the write is made again with the rest. Every update
        sets list elements by position in one request, which DynamoDB applies atomically to
        the item as it is, so workers writing different tiles of one band lose nothing.
        """
        written: list[_Entry] = []
        for start in range(0, len(entries), _TILES_PER_WRITE):
            pending = list(entries[start : start + _TILES_PER_WRITE])
            for _ in range(_CONDITION_ROUNDS):
                if not pending:
                    break
                update = write(pending)
                try:
                    self.table.update_item(
                        Key=_band_key(job_id, band),
                        UpdateExpression=update.expression,
                        ConditionExpression=update.condition,
                        ExpressionAttributeNames=update.names,
                        ExpressionAttributeValues=update.values,
                        ReturnValuesOnConditionCheckFailure="ALL_OLD",
                    )
                except ClientError as e:
                    if not _is_condition_failure(e):
                        raise _translate(e) from e
                    item = self._band_as_it_is(job_id, band, e)
                    if item is None:  # the job's records were deleted
                        return written
                    pending = [entry for entry in pending if update.allows(entry, item)]
                    continue
                except BotoCoreError as e:
                    raise _translate(e) from e
                written += pending
                break
            else:
                raise TransientError(f"the tile records of job {job_id} kept changing")
        return written

    def _band_as_it_is(self, job_id: str, band: int, error: ClientError) -> dict[str, Any] | None:
        """The band item a failed condition saw: in the error, or read again if it is not."""
        old = cast("Mapping[str, Any] | None", error.response.get("Item"))
        if old is not None:
            return {name: _DESERIALIZER.deserialize(value) for name, value in old.items()}
        try:
            return self.table.get_item(Key=_band_key(job_id, band), ConsistentRead=True).get("Item")
        except AWS_ERRORS as e:
            raise _translate(e) from e

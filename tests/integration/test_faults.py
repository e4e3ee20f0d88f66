"""Fault injection on the embedded engine: every fault ends the job SUCCEEDED or FAILED, cleanly.

Faults are injected below the code under test: AWS errors as the botocore `ClientError` a real
service answers with (raised from `BaseClient._make_api_call`, so the project's own adapters
translate them), worker faults by replacing `tilefan.stages.process.execute_tile`. Each row of the
matrix checks the job's final state and error code, the objects left in the bucket, the tile
counts and attempts, the retries the state machine made (with their backoff), and that no
execution is left running.

Retries wait for real in moto's interpreter (IntervalSeconds, BackoffRate, then FULL jitter
draws the wait from [0, interval)). The `backoff` fixture records each interval before the
jitter and makes the draw 0, so a row asserts the exact backoff sequence and does not wait.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pyvips
from botocore.client import BaseClient
from botocore.exceptions import ClientError

import tilefan.stages.merge
import tilefan.stages.pipeline
import tilefan.stages.process
import tilefan.stages.split
from tests.support import assert_identical, libvips_error, noise_image
from tilefan import TransientError, parse_chain
from tilefan.formats.tiled import source_block as process_source_block
from tilefan.imaging.geometry import Rect
from tilefan.local.stack import LOCAL_OWNER, LocalStack, run_job
from tilefan.service.job_service import AlreadyStarted
from tilefan.state.jobs import TERMINAL, JobStatus, TileState
from tilefan.state.storage import TileStore, keys

pytestmark = pytest.mark.integration

TILE = 64
COLUMNS, GRID_ROWS = 5, 4  # a 300 x 200 source in 64-pixel tiles
TILES = COLUMNS * GRID_ROWS
OPS = [{"op": "gaussblur", "sigma": 1.5}, {"op": "invert"}]

# Interval before jitter of each Task's Retry (statemachine/tilefan.asl.json).
WORKER, SPLIT, MERGE, CLEANUP, ABORT = 1.0, 2.0, 2.0, 2.0, 2.0


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "noise.png"
    noise_image(300, 200, 3, seed=21).pngsave(str(path))
    return path


@pytest.fixture
def backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every retry's interval before jitter, in order; the jittered wait becomes 0."""
    from moto.stepfunctions.parser.asl.component.common.retry import jitter_strategy_decl

    intervals: list[float] = []

    def uniform(low: float, high: float) -> float:
        intervals.append(float(high))
        return 0.0

    monkeypatch.setattr(jitter_strategy_decl, "random", SimpleNamespace(uniform=uniform))
    return intervals


def tile_index(out: Rect) -> int:
    return (out.y // TILE) * COLUMNS + out.x // TILE


# --- injecting AWS errors -----------------------------------------------------------------


@dataclass
class Rule:
    """Answer matching calls with an AWS error, ``times`` times (then let them through)."""

    operation: str
    matches: Callable[[dict[str, Any]], bool]
    code: str
    status: int
    times: int = 1
    before: Callable[[Callable[..., Any], Any, dict[str, Any]], None] | None = None
    fired: int = 0


@dataclass
class AwsFaults:
    """Replaces botocore's `_make_api_call`: the adapters above it see real `ClientError`s."""

    rules: list[Rule] = field(default_factory=list)
    condition_failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self,
        operation: str,
        matches: Callable[[dict[str, Any]], bool],
        code: str,
        status: int,
        times: int = 1,
        before: Callable[[Callable[..., Any], Any, dict[str, Any]], None] | None = None,
    ) -> None:
        self.rules.append(Rule(operation, matches, code, status, times, before))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = BaseClient._make_api_call

        def make_api_call(client: Any, operation: str, params: dict[str, Any]) -> Any:
            rule = self._take(operation, params)
            if rule is not None:
                if rule.code == "ConditionalCheckFailedException":
                    self._note_condition_failure(params)
                if rule.before is not None:
                    rule.before(real, client, params)
                raise ClientError(
                    {
                        "Error": {"Code": rule.code, "Message": "injected"},
                        "ResponseMetadata": {"HTTPStatusCode": rule.status},
                    },
                    operation,
                )
            try:
                return real(client, operation, params)
            except ClientError as e:
                if e.response["Error"]["Code"] == "ConditionalCheckFailedException":
                    self._note_condition_failure(params)
                raise

        monkeypatch.setattr(BaseClient, "_make_api_call", make_api_call)

    def _note_condition_failure(self, params: dict[str, Any]) -> None:
        """Notes which item refused: a band by its number (``B001``), another item by its sk."""
        key = params.get("Key", {})
        name = str(key.get("pk")).rsplit("#", 1)[-1] if key.get("sk") == "BAND" else key.get("sk")
        with self.lock:
            self.condition_failures.append(str(name))

    def _take(self, operation: str, params: dict[str, Any]) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.operation == operation and rule.fired < rule.times and rule.matches(params):
                    rule.fired += 1
                    return rule
        return None


def s3_key(fragment: str) -> Callable[[dict[str, Any]], bool]:
    return lambda params: fragment in str(params.get("Key", ""))


def band_update(band: str, marker: str) -> Callable[[dict[str, Any]], bool]:
    """The UpdateItem of one band item (``B001``) whose values include ``marker``: ``:one`` for
    a batch's start, ``:ms0`` for its outcomes."""

    def matches(params: dict[str, Any]) -> bool:
        key = params.get("Key", {})
        return str(key.get("pk")).endswith(f"#{band}") and marker in params.get(
            "ExpressionAttributeValues", {}
        )

    return matches


def job_update_to(status: str) -> Callable[[dict[str, Any]], bool]:
    def matches(params: dict[str, Any]) -> bool:
        values = params.get("ExpressionAttributeValues", {})
        return params.get("Key", {}).get("sk") == "JOB" and values.get(":to") == status

    return matches


def write_partial(real: Callable[..., Any], client: Any, params: dict[str, Any]) -> None:
    """Leave half a file at the key first: the worst a failing writer could leave behind."""
    real(client, "PutObject", {"Bucket": params["Bucket"], "Key": params["Key"], "Body": b"\x89P"})


# --- injecting worker faults ----------------------------------------------------------------


@dataclass
class WorkerFaults:
    """Replaces `execute_tile`: raises ``error()`` on ``tile`` for its first ``times`` calls."""

    tile: int
    error: Callable[[], BaseException]
    times: int
    calls: Counter[int] = field(default_factory=Counter)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = tilefan.stages.process.execute_tile
        lock = threading.Lock()

        def execute_tile(chain: Any, spec: Any, block: Any, out: Rect) -> Any:
            index = tile_index(out)
            with lock:
                self.calls[index] += 1
                fire = index == self.tile and self.calls[index] <= self.times
            if fire:
                raise self.error()
            return real(chain, spec, block, out)

        monkeypatch.setattr(tilefan.stages.process, "execute_tile", execute_tile)


def deliver_twice(monkeypatch: pytest.MonkeyPatch, skipped: list[int]) -> None:
    """Every manifest item is delivered a second time once the first delivery finished."""
    real = tilefan.stages.pipeline.Pipeline.process_batch

    def process_batch(self: Any, job_id: str, tiles: Any) -> Any:
        first = real(self, job_id, tiles)
        second = real(self, job_id, tiles)
        skipped.append(second["skipped"])
        return first

    monkeypatch.setattr(tilefan.stages.pipeline.Pipeline, "process_batch", process_batch)


ALWAYS = 1_000
BATCH_4_TO_7 = "B001"
"""The band of the manifest item of tiles 4-7 (tiles are dealt to bands four at a time)."""


# --- the matrix -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One fault and everything the run must show afterwards."""

    inject: Callable[[AwsFaults, pytest.MonkeyPatch, dict[str, Any]], None]
    status: JobStatus
    code: str | None = None
    message: str = ""
    attempts: dict[int, int] = field(default_factory=dict)
    """Attempts of the named tiles; every other DONE tile was attempted exactly once."""
    tile_states: dict[int, TileState] = field(default_factory=dict)
    backoff: list[float] = field(default_factory=list)
    """Sorted intervals (before jitter) of every retry the state machine made."""
    condition_failures: list[str] = field(default_factory=list)


def _worker(tile: int, error: Callable[[], BaseException], times: int) -> Any:
    def inject(aws: AwsFaults, monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> None:
        WorkerFaults(tile, error, times).install(monkeypatch)

    return inject


def _aws(*rules: tuple[Any, ...]) -> Any:
    def inject(aws: AwsFaults, monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> None:
        for rule in rules:
            aws.add(*rule)

    return inject


def _both(*injections: Any) -> Any:
    def inject(aws: AwsFaults, monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> None:
        for injection in injections:
            injection(aws, monkeypatch, seen)

    return inject


class _Throttled:
    """An S3 client whose ranged reads are answered SlowDown (503), as a busy prefix would."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def head_object(self, **params: Any) -> Any:
        return self.client.head_object(**params)

    def get_object(self, **params: Any) -> Any:
        error = {"Code": "SlowDown", "Message": "injected"}
        raise ClientError(
            {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"
        )


def _throttle_reads_of_tile(index: int, times: int) -> Any:
    """S3 throttles the range reads of tile ``index``'s source block, ``times`` times.

    libvips reads from its own threads, so the reads are told apart by the store the worker
    reads through, not by an AWS rule.
    """

    def inject(aws: AwsFaults, monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> None:
        current, left = threading.local(), [times]
        real_tile, real_block = tilefan.stages.process._process_tile, process_source_block

        def process_tile(pipeline: Any, job_id: str, tile: Any, *args: Any) -> None:
            current.index = tile.index
            real_tile(pipeline, job_id, tile, *args)

        def source_block(store: TileStore, *args: Any) -> Any:
            if getattr(current, "index", None) == index and left[0] > 0:
                left[0] -= 1
                store = TileStore(store.bucket, client=_Throttled(store.client))  # type: ignore[arg-type]
            return real_block(store, *args)

        monkeypatch.setattr(tilefan.stages.process, "_process_tile", process_tile)
        monkeypatch.setattr(tilefan.stages.process, "source_block", source_block)

    return inject


def _duplicates(aws: AwsFaults, monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> None:
    seen["skipped"] = []
    deliver_twice(monkeypatch, seen["skipped"])


MATRIX = {
    "worker-raises-once": Row(
        _worker(7, lambda: TransientError("injected: storage hiccup"), times=1),
        JobStatus.SUCCEEDED,
        attempts={7: 2},
        backoff=[WORKER],
        # The batch is delivered again: its start is refused for the tiles already DONE, once,
        # and made again for tile 7 alone.
        condition_failures=[BATCH_4_TO_7],
    ),
    "worker-raises-always": Row(
        _worker(7, lambda: libvips_error("injected: libvips ran out of memory"), times=ALWAYS),
        JobStatus.FAILED,
        code="TILE_FAILED",
        message="tile 7: injected: libvips ran out of memory",
        attempts={7: 1},
        tile_states={7: TileState.FAILED},
    ),
    "worker-transient-error-outlasts-the-retries": Row(
        _worker(7, lambda: TransientError("injected: storage hiccup"), times=ALWAYS),
        JobStatus.FAILED,
        code="TRANSIENT",
        message="tile 7: injected: storage hiccup (still failing after 6 attempts)",
        attempts={7: 6},  # the first attempt and MaxAttempts 5
        tile_states={7: TileState.RUNNING},
        backoff=[WORKER, 2 * WORKER, 4 * WORKER, 8 * WORKER, 16 * WORKER],
        condition_failures=[BATCH_4_TO_7] * 5,
    ),
    "s3-throttles-the-workers": Row(
        _both(
            _throttle_reads_of_tile(7, 2),
            _aws(("PutObject", s3_key("/out/000012.tif"), "SlowDown", 503, 1)),
        ),
        JobStatus.SUCCEEDED,
        attempts={7: 3, 12: 2},
        backoff=[WORKER, WORKER, 2 * WORKER],
        # Tile 12 is its batch's first: 13-15 were never reached and are started again.
        condition_failures=[BATCH_4_TO_7] * 2,
    ),
    "s3-errors-in-split-and-merge": Row(
        _aws(
            ("PutObject", s3_key("/manifest.json"), "InternalError", 500, 1),
            # The png result goes up as a multipart upload while it is encoded.
            ("UploadPart", s3_key("results/"), "ServiceUnavailable", 503, 1),
        ),
        JobStatus.SUCCEEDED,
        backoff=[SPLIT, MERGE],
    ),
    "dynamodb-throttles-split-and-tile-records": Row(
        _aws(
            ("BatchWriteItem", lambda p: True, "ProvisionedThroughputExceededException", 400, 1),
            ("UpdateItem", band_update("B000", ":ms0"), "ThrottlingException", 400, 1),
        ),
        JobStatus.SUCCEEDED,
        # The outcomes of tiles 0-3 were never recorded: the whole batch runs again.
        attempts={0: 2, 1: 2, 2: 2, 3: 2},
        backoff=[WORKER, SPLIT],
    ),
    "dynamodb-condition-fails-for-tiles-already-done": Row(
        # Tiles 4 and 5 are DONE when tile 6, in the same batch, fails (7 is never reached and
        # goes back to PENDING); the batch is delivered again and DynamoDB's per-tile condition
        # (not DONE) refuses the start, which is made again for 6 and 7 only.
        _worker(6, lambda: TransientError("injected: storage hiccup"), times=1),
        JobStatus.SUCCEEDED,
        attempts={6: 2, 7: 1},
        backoff=[WORKER],
        condition_failures=[BATCH_4_TO_7],
    ),
    "dynamodb-condition-fails-spuriously": Row(
        # A refusal that carries no item: the worker reads the band again (strongly
        # consistent), sees no tile of its batch DONE, and starts them: nothing is lost.
        _aws(("UpdateItem", band_update("B002", ":one"), "ConditionalCheckFailedException", 400)),
        JobStatus.SUCCEEDED,
        attempts={9: 1},
        condition_failures=["B002"],
    ),
    "tiles-delivered-twice": Row(
        _duplicates,
        JobStatus.SUCCEEDED,
        # Every second delivery's start is refused, once per batch, and starts nothing.
        condition_failures=sorted(f"B{band:03d}" for band in range(TILES // 4)),
    ),
    "merger-fails-while-writing-the-result": Row(
        _aws(("UploadPart", s3_key("results/"), "AccessDenied", 403, ALWAYS, write_partial)),
        JobStatus.FAILED,
        code="INTERNAL_ERROR",
        message="storage refused results/",
    ),
    "merger-fails-after-writing-the-result": Row(
        _aws(("UpdateItem", job_update_to("SUCCEEDED"), "ValidationException", 400, ALWAYS)),
        JobStatus.FAILED,
        code="INTERNAL_ERROR",
        message="the job table refused the request (ValidationException)",
    ),
    "s3-errors-while-removing-the-intermediates": Row(
        # The job has SUCCEEDED with its result when its intermediates are removed: a
        # refusal there is retried on its own and never makes the merge run again.
        _aws(("DeleteObjects", lambda p: True, "InternalError", 500, 1)),
        JobStatus.SUCCEEDED,
        backoff=[CLEANUP],
    ),
    "abort-itself-is-throttled": Row(
        _both(
            _worker(7, lambda: libvips_error("injected: libvips ran out of memory"), ALWAYS),
            _aws(("UpdateItem", job_update_to("FAILED"), "ThrottlingException", 400, 1)),
        ),
        JobStatus.FAILED,
        code="TILE_FAILED",
        message="tile 7: injected",
        tile_states={7: TileState.FAILED},
        backoff=[ABORT],
    ),
}


@pytest.mark.parametrize("row", list(MATRIX.values()), ids=list(MATRIX))
def test_fault_ends_the_job_cleanly(
    stack: LocalStack,
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backoff: list[float],
    row: Row,
) -> None:
    aws = AwsFaults()
    seen: dict[str, Any] = {}
    row.inject(aws, monkeypatch, seen)
    aws.install(monkeypatch)
    statuses: list[JobStatus] = []
    output = tmp_path / "out.png"

    view = run_job(
        stack,
        source,
        output,
        OPS,
        output_format="png",
        tile_size=TILE,
        poll_seconds=0.02,
        progress_seconds=0,
        timeout=120,
        on_progress=lambda current: statuses.append(current.job.status),
    )
    job = view.job
    execution = stack.engine.wait(str(job.execution_arn), timeout=60)
    monkeypatch.undo()  # the checks below read the bucket and the table without faults

    # Final state: the expected ending with its code and sentence; never SUCCEEDED otherwise.
    assert job.status is row.status, job.error
    assert execution["status"] == ("SUCCEEDED" if row.status is JobStatus.SUCCEEDED else "FAILED")
    if row.code is None:
        assert job.error is None
    else:
        assert job.error is not None and job.error["code"] == row.code, job.error
        assert row.message in job.error["message"], job.error
        assert JobStatus.SUCCEEDED not in statuses
    assert statuses[-1] in TERMINAL and all(
        s not in TERMINAL or s is statuses[-1] for s in statuses
    ), f"the status changed after the job ended: {statuses}"

    # Stored objects: no intermediates; the result exactly when the job succeeded.
    store = stack.service.store
    assert store.list_keys(keys.job_prefix(job.job_id)) == []
    results = store.list_keys(f"results/{job.job_id}/")
    if row.status is JobStatus.SUCCEEDED:
        assert results == [f"results/{job.job_id}/result.png"]
        expected = reduce(
            lambda im, step: step.apply(im),
            parse_chain(OPS),
            pyvips.Image.new_from_file(str(source)),
        )
        assert_identical(expected, pyvips.Image.new_from_file(str(output)))
    else:
        assert results == [], "a failed job left a result behind"
        assert not output.exists()

    # Counts: the grid, each tile's state and attempts, the retries and their backoff.
    records = {record.index: record for record in stack.service.jobs.tiles(job.job_id, TILES)}
    assert job.grid is not None and job.grid["tile_count"] == TILES
    assert sorted(records) == list(range(TILES))
    for index, record in records.items():
        if index in row.tile_states:
            assert record.state is row.tile_states[index], (index, record)
        elif row.status is JobStatus.SUCCEEDED:
            assert record.state is TileState.DONE, (index, record)
        if index in row.attempts:
            assert record.attempts == row.attempts[index], (index, record)
        elif record.state is TileState.DONE:
            assert record.attempts == 1, (index, record)
    if row.status is JobStatus.SUCCEEDED:
        assert view.progress is not None and view.progress.done == TILES
    assert sorted(backoff) == row.backoff
    assert sorted(aws.condition_failures) == row.condition_failures
    if "skipped" in seen:
        assert sum(seen["skipped"]) == TILES, "a second delivery processed a tile again"

    # Nothing left running.
    sfn = stack.engine.client("stepfunctions")
    running = sfn.list_executions(
        stateMachineArn=stack.engine.state_machine_arn, statusFilter="RUNNING"
    )
    assert running["executions"] == []


# --- cancellation ---------------------------------------------------------------------------


@dataclass
class Gate:
    """Holds one stage of the pipeline at a point until the test opens it."""

    opened: threading.Event = field(default_factory=threading.Event)
    in_flight: Counter[str] = field(default_factory=Counter)
    waiting: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self) -> None:
        with self.lock:
            self.waiting += 1
        assert self.opened.wait(60), "the test never opened the gate"

    def count(self, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Count the calls of a `Pipeline` stage that have not returned yet."""
        real = getattr(tilefan.stages.pipeline.Pipeline, method)

        def counted(pipeline: Any, *args: Any) -> Any:
            with self.lock:
                self.in_flight[method] += 1
            try:
                return real(pipeline, *args)
            finally:
                with self.lock:
                    self.in_flight[method] -= 1

        monkeypatch.setattr(tilefan.stages.pipeline.Pipeline, method, counted)

    def idle(self) -> bool:
        return sum(self.in_flight.values()) == 0


def hold_split(gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tilefan.stages.split.transcode
    monkeypatch.setattr(
        tilefan.stages.split,
        "transcode",
        lambda image, *args: gate.wait() or real(image, *args),
    )


def hold_tiles(gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tilefan.stages.process.execute_tile

    def execute_tile(chain: Any, spec: Any, block: Any, out: Rect) -> Any:
        if tile_index(out) >= 4:  # the first batch runs; every later tile waits
            gate.wait()
        return real(chain, spec, block, out)

    monkeypatch.setattr(tilefan.stages.process, "execute_tile", execute_tile)


def hold_merge(gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tilefan.stages.merge.merge_streamed  # the jobs here make png results
    monkeypatch.setattr(
        tilefan.stages.merge, "merge_streamed", lambda *args: gate.wait() or real(*args)
    )


CANCEL_AT = {
    "splitting": (hold_split, "split", JobStatus.SPLITTING),
    "processing": (hold_tiles, "process_batch", JobStatus.PROCESSING),
    "merging": (hold_merge, "merge", JobStatus.MERGING),
}


@pytest.mark.parametrize("stage", list(CANCEL_AT))
def test_cancelling_mid_run_stops_the_job_and_removes_everything(
    stack: LocalStack, source: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    hold, method, status = CANCEL_AT[stage]
    assert method in ("split", "process_batch", "merge")
    gate = Gate()
    hold(gate, monkeypatch)
    for name in ("split", "process_batch", "merge"):
        gate.count(name, monkeypatch)
    service = stack.service
    job = service.create(
        LOCAL_OWNER,
        OPS,
        "png",
        tile_size=TILE,
        # A preview would make the output tiles 256 pixels: hold_tiles counts 64-pixel ones.
        output_options={"preview": False},
        input_info={"size_bytes": source.stat().st_size},
    )
    service.store.upload(source, keys.upload(job.job_id), "image/png")
    service.start(LOCAL_OWNER, job.job_id, max_concurrency=4)

    def held() -> bool:
        current = service.view(LOCAL_OWNER, job.job_id)
        started = status is not JobStatus.PROCESSING or (
            current.progress is not None and current.progress.done >= 4
        )
        return current.job.status is status and started and gate.waiting > 0

    wait_for(held, f"the job to be held while {stage}")

    cancelled = service.delete(LOCAL_OWNER, job.job_id)  # what DELETE /jobs/{id} runs
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    gate.opened.set()  # the stage in flight finishes now, after the cancellation
    arn = str(cancelled.execution_arn)
    execution = stack.engine.wait(arn, timeout=60)
    wait_for(gate.idle, "the stages in flight to return")

    # Stopped, as on AWS; nothing ran after the cancel: no Abort, and no Merge unless it was
    # the stage in flight.
    assert execution["status"] == "ABORTED"
    sfn = stack.engine.client("stepfunctions")
    history = sfn.get_execution_history(executionArn=arn, maxResults=1000)["events"]
    functions = [
        json.loads(event["taskScheduledEventDetails"]["parameters"])
        for event in history
        if event["type"] == "TaskScheduled"
    ]
    expected = ["SplitterFunction"] + (["MergerFunction"] if stage == "merging" else [])
    assert [f["FunctionName"].rsplit(":", 1)[-1] for f in functions] == expected
    assert all(f["Payload"].get("action") != "abort" for f in functions)

    view = service.view(LOCAL_OWNER, job.job_id)
    assert view.job.status is JobStatus.CANCELLED
    assert view.job.output is None and view.job.error is None
    # Tiles whose input the cancellation removed say so, never where the input was.
    total = int((view.job.grid or {}).get("tile_count", 0))
    errors = [tile.error for tile in service.jobs.tiles(job.job_id, total) if tile.error]
    assert all(error.endswith("the job was cancelled") for error in errors), errors
    assert service.store.list_keys(keys.job_prefix(job.job_id)) == []
    assert service.store.list_keys(f"results/{job.job_id}/") == []
    with pytest.raises(AlreadyStarted):  # the API answers 409 ALREADY_STARTED
        service.start(LOCAL_OWNER, job.job_id)
    assert service.jobs.get(job.job_id).status is JobStatus.CANCELLED
    running = sfn.list_executions(
        stateMachineArn=stack.engine.state_machine_arn, statusFilter="RUNNING"
    )
    assert running["executions"] == []


def test_a_slow_answer_from_start_execution_does_not_undo_the_splitters_progress(
    stack: LocalStack, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found under load: the API recorded the execution with a transition back to QUEUED, and
    # when the splitter had already moved the job to SPLITTING, its move to PROCESSING failed.
    gate = Gate()
    hold_split(gate, monkeypatch)
    real = stack.service.stepfunctions

    class SlowToAnswer:
        """StartExecution that answers only once the execution's splitter is at work."""

        def start_execution(self, **request: Any) -> Any:
            started = real.start_execution(**request)
            wait_for(lambda: gate.waiting > 0, "the splitter to start")
            return started

    monkeypatch.setattr(stack.service, "stepfunctions", SlowToAnswer())
    service = stack.service
    job = service.create(
        LOCAL_OWNER, OPS, "png", tile_size=TILE, input_info={"size_bytes": source.stat().st_size}
    )
    service.store.upload(source, keys.upload(job.job_id), "image/png")
    started = service.start(LOCAL_OWNER, job.job_id)
    assert started.status is JobStatus.SPLITTING and started.execution_arn
    gate.opened.set()
    execution = stack.engine.wait(started.execution_arn, timeout=60)
    assert execution["status"] == "SUCCEEDED", execution.get("cause")
    assert service.jobs.get(job.job_id).status is JobStatus.SUCCEEDED


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)

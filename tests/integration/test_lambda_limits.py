"""Functions in processes of their own, as Lambda runs them: limits enforced by killing.

The engine runs each template function in warm worker processes (``processes=True``). A test
deploys misbehaving handlers in place of the real ones (``tests/handlers/misbehaving.py``), so
they run with that function's variables and limits; the splitter and tile worker there are the
real handlers, made to sleep or allocate while the bucket holds ``test/hold``.

Limits are enforced from outside the process: a kill, so no ``finally`` runs (each test checks
that the handler's ``finally``, which writes ``test/finally-ran``, did not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.handlers.misbehaving import FINALLY, HOLD
from tests.support import noise_image
from tilefan.local.stack import LocalStack, local_stack, run_job
from tilefan.state.jobs import JobStatus, TileState
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration

TIMEOUT_S = 5
"""The lowered Timeout of the misbehaving functions: far above what their real work takes on
a 300 x 200 image, far below the sleep."""
MEMORY_MB = 300
HANDLERS = "tests/handlers/"
PROPERTIES = {
    "SplitterFunction": {"CodeUri": HANDLERS, "Handler": "misbehaving.splitter"},
    "TileWorkerFunction": {
        "CodeUri": HANDLERS,
        "Handler": "misbehaving.tile_worker",
        "MemorySize": MEMORY_MB,
    },
    "ApiFunction": {
        "CodeUri": HANDLERS,
        "Handler": "misbehaving.probe",
        "MemorySize": MEMORY_MB,
        "EphemeralStorage": {"Size": 4},  # MB: below Lambda's least (512), to fill it quickly
    },
}
"""The merger is the real one, with its real limits: Abort runs there."""
OPS = [{"op": "gaussblur", "sigma": 1.5}]


def stack_functions() -> list[str]:
    return [*PROPERTIES, "MergerFunction"]


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    properties = {
        logical_id: {**values, "Timeout": TIMEOUT_S} for logical_id, values in PROPERTIES.items()
    }
    with local_stack(
        processes=True,
        function_properties=properties,
        # One environment each: the second job runs where the first was killed.
        environments=dict.fromkeys(stack_functions(), 1),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("limits") / "noise.png"
    noise_image(300, 200, 3, seed=21).pngsave(str(path))
    return path


@pytest.fixture
def hold(stack: LocalStack) -> Iterator[Any]:
    """``hold("split sleep")`` makes a misbehaving handler misbehave until the test ends."""
    s3 = stack.engine.client("s3")

    def put(how: str) -> None:
        s3.put_object(Bucket=stack.engine.bucket, Key=HOLD, Body=how.encode())

    yield put
    s3.delete_object(Bucket=stack.engine.bucket, Key=HOLD)
    s3.delete_object(Bucket=stack.engine.bucket, Key=FINALLY)


def invoke(logical_id: str, event: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    # boto3's default session: the engine answers its Invoke, as the state machine's.
    answer = boto3.client("lambda", region_name="us-east-1").invoke(
        FunctionName=logical_id, Payload=json.dumps(event).encode()
    )
    return answer.get("FunctionError"), json.loads(answer["Payload"].read())


def leftovers(stack: LocalStack, logical_id: str) -> list[Path]:
    return [
        path
        for tmp in stack.engine.environments(logical_id).environments
        for path in tmp.rglob("*")
        if path.is_file()
    ]


def finally_ran(stack: LocalStack) -> bool:
    listed = stack.engine.client("s3").list_objects_v2(Bucket=stack.engine.bucket, Prefix=FINALLY)
    return bool(listed.get("KeyCount"))


def test_a_function_sees_only_its_own_variables(stack: LocalStack) -> None:
    error, api = invoke("ApiFunction", {"environ": True})
    assert error is None, api
    error, worker = invoke("TileWorkerFunction", {"environ": True})
    assert error is None, worker
    # The API's own variables are the API's: the tile worker never sees them.
    assert api["TILEFAN_STATE_MACHINE_ARN"] == stack.engine.state_machine_arn
    assert "TILEFAN_VIEW_SECRET" in api and "TILEFAN_CLEANUP_FUNCTION" in api
    assert not {"TILEFAN_STATE_MACHINE_ARN", "TILEFAN_VIEW_SECRET"} & set(worker)
    # Both see the Globals, the engine's endpoint and key, and a /tmp of their own.
    for seen in (api, worker):
        assert seen["TILEFAN_BUCKET"] == stack.engine.bucket
        assert seen["AWS_ENDPOINT_URL"] == stack.engine.endpoint_url
        assert seen["AWS_ACCESS_KEY_ID"] == stack.engine.credentials.access_key
    assert api["TMPDIR"] != worker["TMPDIR"]
    # Lambda's own name for the function, as Lambda sets it.
    assert (api["AWS_LAMBDA_FUNCTION_NAME"], worker["AWS_LAMBDA_FUNCTION_NAME"]) == (
        "ApiFunction",
        "TileWorkerFunction",
    )
    # Nothing else of the engine's process: not moto's settings, not the caller's variables.
    assert "MOTO_PORT" not in api and "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE" not in api
    assert "PYTEST_CURRENT_TEST" in os.environ and "PYTEST_CURRENT_TEST" not in api


def test_an_invocation_past_its_timeout_is_killed_as_lambda_kills_it(stack: LocalStack) -> None:
    error, answer = invoke("ApiFunction", {"misbehave": "sleep"})
    assert error == "Unhandled"
    assert answer["errorType"] == "Sandbox.Timedout"
    assert answer["errorMessage"].endswith(f"Error: Task timed out after {TIMEOUT_S}.00 seconds")
    assert not finally_ran(stack)  # killed: its finally block never ran
    error, answer = invoke("ApiFunction", {"environ": True})  # a fresh runtime, same /tmp
    assert error is None and answer["TMPDIR"] == str(
        stack.engine.environments("ApiFunction").environments[0]
    )


def test_an_invocation_past_its_memory_is_killed_as_lambda_kills_it(stack: LocalStack) -> None:
    error, answer = invoke("ApiFunction", {"misbehave": "allocate"})
    assert error == "Unhandled"
    assert answer["errorType"] == "Runtime.OutOfMemory"
    assert answer["errorMessage"].endswith("Error: Runtime exited with error: signal: killed")
    assert not finally_ran(stack)


def test_an_invocation_past_its_ephemeral_storage_is_killed(stack: LocalStack) -> None:
    error, answer = invoke("ApiFunction", {"misbehave": "fill"})
    assert error == "Unhandled"
    # On Lambda the write would fail with ENOSPC; the engine kills the runtime instead.
    assert answer["errorType"] == "Runtime.ExitError"
    assert answer["errorMessage"].endswith("Error: Runtime exited with error: signal: killed")
    assert not finally_ran(stack)
    assert len(leftovers(stack, "ApiFunction")) > 4  # the filled /tmp stays with its environment


def run(stack: LocalStack, source: Path, tmp_path: Path) -> Any:
    return run_job(
        stack, source, tmp_path / "out.png", OPS, output_format="png", tile_size=64, timeout=300
    )


def test_a_splitter_past_its_timeout_fails_the_job_with_the_timeout_code(
    stack: LocalStack, source: Path, tmp_path: Path, hold: Any
) -> None:
    hold("split sleep")
    view = run(stack, source, tmp_path)
    assert view.job.status is JobStatus.FAILED
    assert view.job.error == {"code": "TIMEOUT", "message": "a stage of the job ran out of time"}
    assert not finally_ran(stack)
    assert view.job.grid is None  # no tile grid, no tile records
    assert not stack.service.store.list_keys(keys.job_prefix(view.job.job_id))
    # As on Lambda, the killed invocation's /tmp stays with its environment.
    assert [path.name for path in leftovers(stack, "SplitterFunction")] == ["partial.tif"]
    stack.engine.client("s3").delete_object(Bucket=stack.engine.bucket, Key=HOLD)
    assert run(stack, source, tmp_path).job.status is JobStatus.SUCCEEDED


@pytest.mark.parametrize("how", ["sleep", "allocate"])
def test_a_tile_worker_killed_for_time_or_memory_fails_the_job_and_leaves_nothing(
    stack: LocalStack, source: Path, tmp_path: Path, hold: Any, how: str
) -> None:
    hold(f"tile {how}")
    view = run(stack, source, tmp_path)
    assert view.job.status is JobStatus.FAILED
    assert view.job.error is not None
    assert view.job.error["code"] == "TILE_FAILED"
    # A batch's outcomes are recorded when it ends: killed at tile 7, its batch (tiles 4 to 7)
    # recorded nothing, and Abort names the batch's first tile left RUNNING.
    assert view.job.error["message"] == (
        "tile 4: its worker stopped before finishing it (it ran out of time or memory)"
    )
    assert not finally_ran(stack)
    records = stack.service.jobs.tiles(view.job.job_id, 20, consistent=True)
    # No retry: Sandbox.Timedout and Runtime.OutOfMemory are in no Retry.
    for index in range(4, 8):
        assert (records[index].state, records[index].attempts) == (TileState.RUNNING, 1)
    assert not stack.service.store.list_keys(keys.job_prefix(view.job.job_id))
    assert not stack.service.store.list_keys(keys.result_prefix(view.job.job_id))

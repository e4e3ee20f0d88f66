"""The storage and job-table adapters turn a failing network into the error that is retried.

Faults are injected where botocore sends: a ``before-send`` handler raises what the HTTP layer
would raise, or answers with a body that breaks while it is read, so the adapters see exactly
what botocore hands them on AWS. Nothing here reaches the network.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import (
    ConnectionClosedError,
    EndpointConnectionError,
    ParamValidationError,
    ReadTimeoutError,
)
from urllib3.exceptions import ProtocolError

from tilefan.errors import TilefanError, TransientError
from tilefan.state.jobs import JobRepository, TileOutcome, TileState
from tilefan.state.storage import TileStore

pytestmark = pytest.mark.unit

ENDPOINT = "https://example.invalid"
_CLIENT_ARGS: dict[str, Any] = {
    "region_name": "us-east-1",
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    # One attempt: botocore's own retries would only repeat the injected fault.
    "config": Config(retries={"max_attempts": 1, "mode": "standard"}),
}

Fault = Callable[..., Any]


def refuse(error: Exception) -> Fault:
    def send(**_: Any) -> Any:
        raise error

    return send


class _Raw(io.BytesIO):
    """A response body as urllib3 gives it; ``fail`` breaks the stream while it is read."""

    def __init__(self, data: bytes, fail: Exception | None = None) -> None:
        super().__init__(data)
        self.fail = fail

    def read(self, size: int | None = -1) -> bytes:
        if self.fail is not None:
            raise self.fail
        return super().read(size)

    def stream(self, **_: Any) -> Any:
        yield self.read()


def answer(
    status: int, body: bytes, headers: dict[str, str], fail: Exception | None = None
) -> Fault:
    def send(request: Any, **_: Any) -> AWSResponse:
        return AWSResponse(request.url, status, headers, _Raw(body, fail))

    return send


def store_with(operation: str, fault: Fault) -> TileStore:
    client = boto3.client("s3", endpoint_url=ENDPOINT, **_CLIENT_ARGS)
    client.meta.events.register(f"before-send.s3.{operation}", fault)
    return TileStore("bucket", client=client)


def jobs_with(operation: str, fault: Fault) -> JobRepository:
    resource = boto3.resource("dynamodb", endpoint_url=ENDPOINT, **_CLIENT_ARGS)
    resource.meta.client.meta.events.register(f"before-send.dynamodb.{operation}", fault)
    return JobRepository("table", resource=resource)


NETWORK_FAULTS = {
    "read timeout": refuse(ReadTimeoutError(endpoint_url=ENDPOINT)),
    "no connection": refuse(EndpointConnectionError(endpoint_url=ENDPOINT)),
    "connection closed": refuse(ConnectionClosedError(endpoint_url=ENDPOINT)),
    # Headers arrived, then the connection broke mid-body: botocore's ResponseStreamingError.
    "dropped mid-body": answer(
        200, b"x" * 100, {"Content-Length": "100"}, ProtocolError("Connection broken")
    ),
    # The connection closed early and cleanly: fewer bytes than Content-Length promised.
    "truncated body": answer(200, b"x" * 10, {"Content-Length": "100"}),
}


@pytest.mark.parametrize("fault", NETWORK_FAULTS.values(), ids=NETWORK_FAULTS)
def test_storage_read_failing_on_the_network_is_transient(fault: Fault) -> None:
    with pytest.raises(TransientError, match="storage"):
        store_with("GetObject", fault).get_json("jobs/j/manifest.json")


@pytest.mark.parametrize("name", ["read timeout", "no connection", "connection closed"])
@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("PutObject", lambda store: store.put_json("jobs/j/manifest.json", [])),
        ("HeadObject", lambda store: store.size("uploads/j/source")),
        ("ListObjectsV2", lambda store: store.delete_prefix("jobs/j/")),
        ("ListObjectsV2", lambda store: store.list_keys("jobs/j/")),
    ],
    ids=["put", "head", "delete-prefix", "list"],
)
def test_every_storage_call_failing_on_the_network_is_transient(
    name: str, operation: str, call: Callable[[TileStore], Any]
) -> None:
    with pytest.raises(TransientError):
        call(store_with(operation, NETWORK_FAULTS[name]))


@pytest.mark.parametrize("name", ["read timeout", "no connection", "connection closed"])
@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("GetItem", lambda jobs: jobs.get("j")),
        ("BatchGetItem", lambda jobs: jobs.tiles("j", 3)),
        ("UpdateItem", lambda jobs: jobs.tiles_started("j", [0])),
        ("UpdateItem", lambda jobs: jobs.tiles_finished("j", [TileOutcome(0, TileState.DONE, 10)])),
        ("UpdateItem", lambda jobs: jobs.finish_failed("j", "TILE_FAILED", "tile 0: broken")),
        ("BatchWriteItem", lambda jobs: jobs.create_tiles("j", 3)),
        ("UpdateItem", lambda jobs: jobs.create_pass_tiles("j", {0: 3})),
        ("UpdateItem", lambda jobs: jobs.pass_tiles_done("j", 0, [0, 1])),
        ("BatchGetItem", lambda jobs: jobs.progress_with_passes("j", 3, {0: 5})),
        ("Query", lambda jobs: jobs.list_for_owner("o", limit=5)),
    ],
    ids=[
        "get",
        "tiles",
        "tile-started",
        "tile-finished",
        "finish-failed",
        "create-tiles",
        "create-pass-tiles",
        "pass-tiles-done",
        "pass-progress",
        "list",
    ],
)
def test_every_job_table_call_failing_on_the_network_is_transient(
    name: str, operation: str, call: Callable[[JobRepository], Any]
) -> None:
    with pytest.raises(TransientError, match="job table"):
        call(jobs_with(operation, NETWORK_FAULTS[name]))


def test_a_bad_parameter_is_not_retried_as_transient() -> None:
    store = store_with("GetObject", refuse(ParamValidationError(report="no key")))
    with pytest.raises(TilefanError) as raised:
        store.get_json("jobs/j/manifest.json")
    assert not isinstance(raised.value, TransientError)


def _delete_objects_answer(errors: str) -> Fault:
    body = f'<?xml version="1.0"?><DeleteResult>{errors}</DeleteResult>'.encode()
    return answer(200, body, {"Content-Length": str(len(body))})


def _listing() -> Fault:
    body = (
        b'<?xml version="1.0"?><ListBucketResult><Name>bucket</Name><Prefix>jobs/j/</Prefix>'
        b"<KeyCount>2</KeyCount><IsTruncated>false</IsTruncated>"
        b"<Contents><Key>jobs/j/a</Key></Contents><Contents><Key>jobs/j/b</Key></Contents>"
        b"</ListBucketResult>"
    )
    return answer(200, body, {"Content-Length": str(len(body))})


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        ("AccessDenied", TilefanError),
        ("SlowDown", TransientError),
        ("InternalError", TransientError),
    ],
)
def test_delete_objects_refusing_a_key_in_a_200_answer_raises(
    code: str, raised: type[TilefanError]
) -> None:
    store = store_with("ListObjectsV2", _listing())
    refused = f"<Error><Key>jobs/j/b</Key><Code>{code}</Code><Message>no</Message></Error>"
    store.client.meta.events.register(
        "before-send.s3.DeleteObjects", _delete_objects_answer(refused)
    )
    with pytest.raises(raised, match=code) as error:
        store.delete_prefix("jobs/j/")
    assert "jobs/j/b" in str(error.value)
    assert (raised is TransientError) == isinstance(error.value, TransientError)


def test_delete_objects_deleting_every_key_counts_them() -> None:
    store = store_with("ListObjectsV2", _listing())
    store.client.meta.events.register("before-send.s3.DeleteObjects", _delete_objects_answer(""))
    assert store.delete_prefix("jobs/j/") == 2

"""Assembling an object from bytes and ranges of other objects, on moto's S3."""

from __future__ import annotations

import inspect
import logging
import threading
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from typing import Any

import botocore.client
import pytest
from botocore.exceptions import EndpointConnectionError

import tilefan.state.multipart
from tilefan import TransientError
from tilefan.local.stack import local_stack
from tilefan.state.multipart import (
    MIN_PART,
    MIN_PART_SIZE,
    Range,
    TooManyParts,
    abort_uploads,
    assemble_object,
    copy_part,
    open_upload,
    put_joined,
)
from tilefan.state.storage import ObjectMissing, TileStore

pytestmark = pytest.mark.integration

MIB = 2**20


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    seen: Counter[str] = Counter()
    real = botocore.client.BaseClient._make_api_call

    def counted(self: Any, operation: str, params: Any) -> Any:
        seen[operation] += 1
        return real(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counted)
    return seen


def put(store: TileStore, key: str, size: int, fill: int) -> bytes:
    body = bytes([fill]) * size
    store.put_bytes(key, body)
    return body


def test_large_ranges_are_copied_and_small_pieces_gathered(
    store: TileStore, calls: Counter[str]
) -> None:
    big = put(store, "big", 12 * MIB, 1)
    small = put(store, "small", 3 * MIB, 2)
    other = put(store, "other", 8 * MIB, 3)
    head, tail = b"head" * 10, b"tail"
    pieces: list[bytes | Range] = [
        head,
        Range("big", 0, len(big)),  # topped up from its head, the rest copied
        Range("small", 1, len(small) - 1),  # read into a plain part
        Range("other", 0, len(other)),
        tail,
    ]
    size = assemble_object(store, "result", pieces, "application/octet-stream")
    expected = head + big + small[1:] + other + tail
    assert size == len(expected)
    assert store.get_range("result", 0, size) == expected
    assert calls["UploadPartCopy"] == 2, calls
    assert calls["AbortMultipartUpload"] == 0


def test_small_pieces_only_make_one_plain_part(store: TileStore, calls: Counter[str]) -> None:
    put(store, "a", 1000, 4)
    size = assemble_object(store, "result", [b"x", Range("a", 10, 20)], "image/tiff")
    assert size == 21
    assert store.get_range("result", 0, size) == b"x" + bytes([4]) * 20
    assert (calls["UploadPart"], calls["UploadPartCopy"]) == (1, 0)


def test_too_many_parts_fails_with_a_code_and_leaves_no_upload(
    store: TileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tilefan.state.multipart, "MAX_PARTS", 2)
    put(store, "big", MIN_PART, 5)
    with pytest.raises(TooManyParts):
        assemble_object(store, "result", [Range("big", 0, MIN_PART)] * 3, "image/tiff")
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def _prepared(store: TileStore, copies: dict[int, Range]) -> tuple[str, list[Range]]:
    """An upload with ``copies`` copied into it at their part numbers, as workers do, and
    the ranges as the merger names them (part and ETag)."""
    upload_id = open_upload(store, "result", "image/tiff")
    named = [
        Range(r.key, r.start, r.length, n, copy_part(store, "result", upload_id, n, r))
        for n, r in copies.items()
    ]
    return upload_id, named


def test_a_prepared_uploads_copies_are_taken_as_they_are(
    store: TileStore, calls: Counter[str]
) -> None:
    """The merger's parts go between the reserved numbers; the ranges workers copied are
    not copied again, but the one a short part is topped up from is."""
    a = put(store, "a", 12 * MIB, 1)
    b = put(store, "b", 6 * MIB, 2)
    c = put(store, "c", 7 * MIB, 3)
    small = put(store, "small", 2 * MIB, 4)
    upload_id, (ra, rb, rc) = _prepared(
        store, {40: Range("a", 0, len(a)), 41: Range("b", 0, len(b)), 90: Range("c", 0, len(c))}
    )
    calls.clear()
    head = b"head" * 100
    pieces: list[bytes | Range] = [head, ra, rb, Range("small", 0, len(small)), rc]
    size = assemble_object(store, "result", pieces, "image/tiff", upload_id=upload_id)
    expected = head + a + b + small + c
    assert size == len(expected)
    assert store.get_range("result", 0, size) == expected
    # The head is topped up from a's head and a's rest copied again; b is kept; c cannot top
    # small up and still pass 5 MiB, so both are read into the last part.
    assert (calls["UploadPartCopy"], calls["UploadPart"], calls["ListParts"]) == (1, 2, 1), calls


def test_a_prepared_upload_with_a_missing_or_stale_copy_is_repaired(
    store: TileStore, calls: Counter[str]
) -> None:
    a = put(store, "a", 6 * MIB, 1)
    b = put(store, "b", 6 * MIB, 2)
    upload_id, (ra,) = _prepared(store, {10: Range("a", 0, len(a))})
    rb = Range("b", 0, len(b), 11, '"an etag of a copy that never ran"')
    calls.clear()
    size = assemble_object(store, "result", [ra, rb], "image/tiff", upload_id=upload_id)
    assert store.get_range("result", 0, size) == a + b
    assert calls["UploadPartCopy"] == 1, calls


def test_reserved_numbers_taken_by_the_parts_before_them_are_given_up(
    store: TileStore, calls: Counter[str]
) -> None:
    """Reserved numbers that leave too few between them for the other parts: every range
    is placed as without them, in the same upload."""
    a = put(store, "a", 6 * MIB, 1)
    big = put(store, "big", 30 * MIB, 5)
    upload_id, (ra,) = _prepared(store, {2: Range("a", 0, len(a))})
    calls.clear()
    pieces: list[bytes | Range] = [b"h", Range("big", 0, len(big)), ra]
    size = assemble_object(store, "result", pieces, "image/tiff", upload_id=upload_id)
    assert store.get_range("result", 0, size) == b"h" + big + a
    assert calls["UploadPartCopy"] == 2, calls
    assert abort_uploads(store, "") == 0  # the prepared upload was the one completed


def test_a_prepared_upload_that_is_gone_is_made_again(
    store: TileStore, calls: Counter[str]
) -> None:
    """A merge retried after it completed the upload (the job's transition failed): the
    copies are gone with it, and a new upload is assembled from the ranges."""
    a = put(store, "a", 6 * MIB, 1)
    upload_id, (ra,) = _prepared(store, {3: Range("a", 0, len(a))})
    assert abort_uploads(store, "res") == 1
    size = assemble_object(store, "result", [b"h", ra], "image/tiff", upload_id=upload_id)
    assert store.get_range("result", 0, size) == b"h" + a
    assert calls["CreateMultipartUpload"] == 2


def test_a_failed_assembly_leaves_a_prepared_upload_for_its_retry(
    store: TileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = put(store, "a", 6 * MIB, 1)
    upload_id, (ra,) = _prepared(store, {3: Range("a", 0, len(a))})
    with pytest.raises(ObjectMissing):
        assemble_object(
            store, "result", [Range("gone", 0, 10), ra], "image/tiff", upload_id=upload_id
        )
    size = assemble_object(store, "result", [b"h", ra], "image/tiff", upload_id=upload_id)
    assert store.get_range("result", 0, size) == b"h" + a


def test_a_connection_lost_while_copying_is_a_transient_error_and_leaves_no_upload(
    store: TileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(store, "big", 6 * MIB, 1)

    def dropped(**kwargs: Any) -> Any:
        raise EndpointConnectionError(endpoint_url="https://s3.example")

    monkeypatch.setattr(store.client, "upload_part_copy", dropped)
    with pytest.raises(TransientError):
        assemble_object(store, "result", [Range("big", 0, 6 * MIB)], "image/tiff")
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_the_mergers_client_keeps_a_connection_for_every_request_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over real HTTP (the engine as a server), the merger's own client assembles an object of
    40 copied parts: urllib3 drops no connection (botocore's default pool of 10 dropped one
    for each request past it, which on AWS is a new TLS handshake)."""
    with local_stack(server=True) as stack:
        merger = inspect.unwrap(stack.engine.handler("MergerFunction")).__globals__
        store = merger["pipeline"].store
        put(store, "jobs/job/source", MIN_PART, 7)
        with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
            size = assemble_object(
                store, "jobs/job/result", [Range("jobs/job/source", 0, MIN_PART)] * 40, "x/y"
            )
        assert size == 40 * MIN_PART
    assert not [record for record in caplog.records if "pool is full" in record.getMessage()]


@pytest.mark.parametrize(("buffers", "requests"), [(3, {"PutObject": 1}), (12, {"UploadPart": 8})])
def test_joined_buffers_are_one_object_in_their_order(
    store: TileStore, calls: Counter[str], buffers: int, requests: dict[str, int]
) -> None:
    """Three 5 MiB buffers go in one PUT; twelve (60 MiB) by multipart upload, in 8 MiB
    parts cut across the buffers' ends."""
    parts = [bytes([n]) * (5 * MIB) for n in range(buffers)]
    put_joined(store, "jobs/job/joined", len(parts) * 5 * MIB, iter(parts))
    assert store.get_bytes("jobs/job/joined") == b"".join(parts)
    assert {operation: calls[operation] for operation in requests} == requests


class _PartsClient:
    """Takes an object or a multipart upload's parts, and keeps only their sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def create_multipart_upload(self, **_: Any) -> dict[str, str]:
        return {"UploadId": "upload"}

    def upload_part(self, *, PartNumber: int, Body: bytes, **_: Any) -> dict[str, str]:  # noqa: N803
        with self.lock:
            self.sizes.append(len(Body))
        return {"ETag": f'"{PartNumber}"'}

    def complete_multipart_upload(self, **_: Any) -> None:
        return None

    def put_object(self, *, Body: bytes, **_: Any) -> None:  # noqa: N803
        self.sizes.append(len(Body))


def test_large_joined_buffers_are_sent_without_joining_them() -> None:
    """120 MiB of buffers, each dropped once sent: what is allocated beside them is a few
    parts, not their join (a worker's batch of encoded levels was held twice)."""
    client = _PartsClient()
    store = TileStore("bucket", client=client)  # type: ignore[arg-type]
    buffers = [bytearray(10 * MIB) for _ in range(12)]

    def drained() -> Iterator[bytearray]:
        while buffers:
            yield buffers.pop(0)

    tracemalloc.start()
    try:
        put_joined(store, "jobs/job/joined", 120 * MIB, drained())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(client.sizes) == 120 * MIB
    assert all(size >= MIN_PART_SIZE for size in client.sizes[:-1])
    assert peak < 6 * MIN_PART_SIZE < 120 * MIB / 2

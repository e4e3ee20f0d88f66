"""Assembling an object from bytes and ranges of other objects, on moto's S3."""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.client
import pytest
from moto import mock_aws

import tilefan.state.multipart
from tilefan.local.stack import local_stack
from tilefan.state.multipart import MIN_PART, Range, TooManyParts, assemble_object
from tilefan.state.storage import TileStore

pytestmark = pytest.mark.integration

MIB = 2**20


@pytest.fixture
def store() -> Iterator[TileStore]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="tilefan-test")
        yield TileStore("tilefan-test", client=client)


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
    assert store.client.list_multipart_uploads(Bucket="tilefan-test").get("Uploads", []) == []


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

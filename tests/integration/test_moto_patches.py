"""The engine's changes to moto and botocore: each finds what it replaces, and each still
answers as moto and botocore would without it (so a change in either makes these fail)."""

from __future__ import annotations

import base64
import gc
import json
import os
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError, create_parser
from moto import mock_aws

from tilefan.errors import TileFailed
from tilefan.local.engine import EmbeddedEngine
from tilefan.local.moto_patches import MotoPatches

pytestmark = pytest.mark.integration

TABLE = "patched"
OTHER_TABLE = "patched-too"

EVERY_TYPE: dict[str, Any] = {
    "s": {"S": 'ünïcødé 🎉 and "quotes"'},
    "empty_s": {"S": ""},
    "n": {"N": "-12.50"},
    "big_n": {"N": "1E+30"},
    "b": {"B": bytes(range(256))},
    "ss": {"SS": ["b", "a", "ç"]},
    "ns": {"NS": ["1", "2.5", "-3"]},
    "bs": {"BS": [b"\x00", b"\xff\xfe"]},
    "yes": {"BOOL": True},
    "no": {"BOOL": False},
    "nothing": {"NULL": True},
    "letters": {"L": [{"S": "P"}, {"S": "R"}, {"N": "3"}, {"NULL": True}, {"BOOL": False}]},
    "empty_l": {"L": []},
    "empty_m": {"M": {}},
    "nested": {
        "M": {
            "l": {"L": [{"M": {"b": {"B": b"\x01\x02"}, "ss": {"SS": ["x"]}}}, {"L": []}]},
            "n": {"N": "0"},
        }
    },
}


def _key(pk: str) -> dict[str, Any]:
    return {"pk": {"S": pk}, "sk": {"S": "BAND"}}


@pytest.fixture
def dynamodb() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        for name in (TABLE, OTHER_TABLE):
            client.create_table(
                TableName=name,
                KeySchema=[
                    {"AttributeName": "pk", "KeyType": "HASH"},
                    {"AttributeName": "sk", "KeyType": "RANGE"},
                ],
                AttributeDefinitions=[
                    {"AttributeName": "pk", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "S"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
        for number in range(3):
            client.put_item(TableName=TABLE, Item={**_key(f"item-{number}"), **EVERY_TYPE})
        client.put_item(TableName=OTHER_TABLE, Item={**_key("other"), "g": {"L": [{"S": "D"}]}})
        yield client


def _answer(client: Any, request_items: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The JSON body DynamoDB's stand-in wrote and what the client parsed from it."""
    bodies: list[bytes] = []

    def keep_body(response_dict: dict[str, Any], **kwargs: Any) -> None:
        bodies.append(response_dict["body"])

    client.meta.events.register("before-parse.dynamodb.BatchGetItem", keep_body)
    try:
        parsed = client.batch_get_item(RequestItems=request_items)
    except ClientError as e:
        return {"refused": e.response["Error"]}, {}
    finally:
        client.meta.events.unregister("before-parse.dynamodb.BatchGetItem", keep_body)
    parsed.pop("ResponseMetadata")
    return json.loads(bodies[-1]), parsed


def _patched_and_not(client: Any, request_items: dict[str, Any]) -> list[Any]:
    patches = MotoPatches()
    patches.install()
    try:
        patched = _answer(client, request_items)
    finally:
        patches.uninstall()
    return [patched, _answer(client, request_items)]


def _sorted_items(answer: Any) -> Any:
    """Responses in key order and sets' members sorted: DynamoDB promises neither order (a
    set's members come out in whatever order the hash seed gives)."""
    body, parsed = answer
    for side in (body, parsed):
        for items in side.get("Responses", {}).values():
            items.sort(key=lambda item: str(item.get("pk")))
        _sort_sets(side)
    return answer


def _sort_sets(value: Any) -> None:
    """Sort the members of every string, number and binary set in a DynamoDB answer."""
    if isinstance(value, dict):
        for name, member in value.items():
            if name in ("SS", "NS", "BS") and isinstance(member, list):
                member.sort()
            else:
                _sort_sets(member)
    elif isinstance(value, list):
        for member in value:
            _sort_sets(member)


PLAIN_REQUESTS: dict[str, dict[str, Any]] = {
    "whole items": {TABLE: {"Keys": [_key("item-0"), _key("item-2")]}},
    "a projection": {TABLE: {"Keys": [_key("item-1")], "ProjectionExpression": "pk, letters"}},
    "a projection by name, read consistently": {
        TABLE: {
            "Keys": [_key("item-0"), _key("item-1")],
            "ProjectionExpression": "#p, #b, nested",
            "ExpressionAttributeNames": {"#p": "pk", "#b": "bs"},
            "ConsistentRead": True,
        }
    },
    "an attribute no item has": {TABLE: {"Keys": [_key("item-0")], "ProjectionExpression": "x"}},
    "keys with no item": {TABLE: {"Keys": [_key("missing"), _key("item-2")]}},
    "two tables": {
        TABLE: {"Keys": [_key("item-0")], "ProjectionExpression": "pk, b"},
        OTHER_TABLE: {"Keys": [_key("other")]},
    },
}


@pytest.mark.parametrize("case", list(PLAIN_REQUESTS))
def test_plain_batch_reads_answer_as_moto_does(dynamodb: Any, case: str) -> None:
    patched, moto = (
        _sorted_items(answer) for answer in _patched_and_not(dynamodb, PLAIN_REQUESTS[case])
    )
    assert patched == moto


OTHER_REQUESTS: dict[str, dict[str, Any]] = {
    "a nested path and a list element": {
        TABLE: {"Keys": [_key("item-0")], "ProjectionExpression": "nested.n, letters[1]"}
    },
    "AttributesToGet": {TABLE: {"Keys": [_key("item-0")], "AttributesToGet": ["pk", "n"]}},
    "duplicate keys": {TABLE: {"Keys": [_key("item-0"), _key("item-0")]}},
    "more than 100 keys": {TABLE: {"Keys": [_key(f"k{number}") for number in range(101)]}},
    "an unknown table": {"no-such-table": {"Keys": [_key("item-0")]}},
    "a name the projection does not use": {
        TABLE: {
            "Keys": [_key("item-0")],
            "ProjectionExpression": "pk",
            "ExpressionAttributeNames": {"#unused": "n"},
        }
    },
}


@pytest.mark.parametrize("case", list(OTHER_REQUESTS))
def test_other_batch_reads_are_left_to_moto(dynamodb: Any, case: str) -> None:
    patched, moto = (
        _sorted_items(answer) for answer in _patched_and_not(dynamodb, OTHER_REQUESTS[case])
    )
    assert patched == moto


def test_an_answer_past_16_mb_is_cut_short_as_moto_cuts_it(dynamodb: Any) -> None:
    # 45 items of 390 KB: moto puts what passes 16 MB in UnprocessedKeys.
    blob = "x" * 390_000
    keys = [_key(f"big-{number:02d}") for number in range(45)]
    for key in keys:
        dynamodb.put_item(TableName=TABLE, Item={**key, "blob": {"S": blob}})
    patched, moto = _patched_and_not(dynamodb, {TABLE: {"Keys": keys}})
    assert moto[1]["UnprocessedKeys"], "moto no longer cuts an answer past 16 MB short"
    assert len(patched[1]["Responses"][TABLE]) == len(moto[1]["Responses"][TABLE])
    assert patched[1]["UnprocessedKeys"] == moto[1]["UnprocessedKeys"]


def test_plain_batch_reads_are_stale_or_fresh_as_they_ask(dynamodb: Any) -> None:
    # The answer is made inside the engine's DynamoDB lock, where stale reads swap the tables.
    read = {"Keys": [_key("item-0")], "ProjectionExpression": "g"}
    patches = MotoPatches()
    patches.install()
    try:
        with patches.stale_reads():
            dynamodb.put_item(TableName=TABLE, Item={**_key("item-0"), "g": {"L": [{"S": "D"}]}})
            stale = dynamodb.batch_get_item(RequestItems={TABLE: read})
            fresh = dynamodb.batch_get_item(RequestItems={TABLE: {**read, "ConsistentRead": True}})
    finally:
        patches.uninstall()
    assert stale["Responses"][TABLE] == [{}]  # item-0 as it was: no "g" yet
    assert fresh["Responses"][TABLE] == [{"g": {"L": [{"S": "D"}]}}]


def test_the_batch_read_and_the_value_parse_replace_moto_and_botocore_while_installed() -> None:
    from botocore.parsers import BaseJSONParser
    from moto.dynamodb.responses import DynamoHandler

    originals = (DynamoHandler.batch_get_item, BaseJSONParser.__dict__["_handle_structure"])
    patches = MotoPatches()
    patches.install()
    try:
        assert DynamoHandler.batch_get_item is not originals[0]
        assert BaseJSONParser.__dict__["_handle_structure"] is not originals[1]
    finally:
        patches.uninstall()
    assert (DynamoHandler.batch_get_item, BaseJSONParser.__dict__["_handle_structure"]) == originals


def _parse(body: dict[str, Any]) -> dict[str, Any]:
    model = botocore.session.get_session().get_service_model("dynamodb")
    shape = model.operation_model("GetItem").output_shape
    try:
        parsed: dict[str, Any] = create_parser("json").parse(
            {"body": json.dumps(body).encode(), "headers": {}, "status_code": 200}, shape
        )
    except ResponseParserError as e:
        return {"refused": str(e)}
    return parsed


def _wire(value: Any) -> Any:
    """A test value as DynamoDB's JSON carries it (binary in base64)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {name: _wire(inner) for name, inner in value.items()}
    if isinstance(value, list):
        return [_wire(inner) for inner in value]
    return value


VALUE_BODIES: dict[str, dict[str, Any]] = {
    "every type": {"Item": _wire(EVERY_TYPE)},
    "null list elements": {
        "Item": {
            "l": {"L": [None, {"S": "a"}, {"M": {"m": None}}]},
            "bs": {"BS": [None, "AAE="]},
            "ss": {"SS": [None, "a"]},
        }
    },
    "a member this botocore does not know": {"Item": {"x": {"XX": "1"}, "l": {"L": [{"XX": 1}]}}},
    "a member with no value": {"Item": {"l": {"L": [{"S": None, "N": "1"}]}}},
    "a list element of null": {"Item": {"l": {"L": [{"S": None}]}}},
    "two members set": {"Item": {"l": {"L": [{"S": "a", "N": "1"}]}, "m": {"S": "a", "N": "1"}}},
}


@pytest.mark.parametrize("case", list(VALUE_BODIES))
def test_dynamodb_values_parse_as_botocore_parses_them(case: str) -> None:
    body = VALUE_BODIES[case]
    patches = MotoPatches()
    patches.install()
    try:
        patched = _parse(body)
    finally:
        patches.uninstall()
    assert patched == _parse(body)


class _Job:
    """Stand-in handlers for the pipeline: a split of ``batches`` items, a worker given by
    the test, and a merger that records what it is asked to do."""

    def __init__(self, batches: int, worker: Any) -> None:
        self.batches = batches
        self.worker = worker
        self.merger_actions: list[str] = []

    def splitter(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        key = f"jobs/{event['job_id']}/manifest.json"
        manifest = [{"batch": number, "tiles": [number]} for number in range(self.batches)]
        boto3.client("s3").put_object(
            Bucket=os.environ["TILEFAN_BUCKET"], Key=key, Body=json.dumps(manifest).encode()
        )
        return {
            "manifest_key": key,
            "tile_count": self.batches,
            "batch_count": self.batches,
            "statistics_manifest_key": None,
            "fanout_manifest_key": None,
        }

    def merger(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        self.merger_actions.append(event["action"])
        return {"action": event["action"]}

    def handlers(self) -> dict[str, Any]:
        return {
            "SplitterFunction": self.splitter,
            "TileWorkerFunction": self.worker,
            "MergerFunction": self.merger,
        }


def _broken_worker(event: dict[str, Any], context: Any) -> None:
    raise TileFailed(f"batch {event['item']['batch']} cannot be processed")


def _run_failing_map(monkeypatch: pytest.MonkeyPatch, *, with_patch: bool) -> tuple[str, _Job]:
    if not with_patch:
        monkeypatch.setattr(MotoPatches, "_install_failure_threshold", lambda patches: None)
    job = _Job(batches=3, worker=_broken_worker)
    with EmbeddedEngine(handlers=job.handlers()) as engine:
        arn = engine.start_job("job-1", max_concurrency=3)
        status = str(engine.wait(arn, timeout=60)["status"])
    return status, job


def test_a_failed_map_item_fails_the_map_with_the_patch_and_not_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status, job = _run_failing_map(monkeypatch, with_patch=True)
    assert (status, job.merger_actions) == ("FAILED", ["abort"])
    # moto as it is lets every item fail and the Map succeed; if it stops doing so, the
    # patch has nothing left to do and this says so.
    status, job = _run_failing_map(monkeypatch, with_patch=False)
    assert (status, job.merger_actions) == ("SUCCEEDED", ["merge", "cleanup"])


def _stop_while_the_split_runs(monkeypatch: pytest.MonkeyPatch, *, with_patch: bool) -> str:
    if not with_patch:
        monkeypatch.setattr(MotoPatches, "_keep_stops", lambda patches: None)
    running, stopped = threading.Event(), threading.Event()

    def splitter(event: dict[str, Any], context: Any) -> None:
        running.set()
        stopped.wait(timeout=30)
        raise TileFailed("failed after the execution was stopped")

    job = _Job(batches=1, worker=_broken_worker)
    handlers = {**job.handlers(), "SplitterFunction": splitter}
    with EmbeddedEngine(handlers=handlers) as engine:
        arn = engine.start_job("job-1", max_concurrency=1)
        assert running.wait(timeout=30)
        engine.client("stepfunctions").stop_execution(executionArn=arn, cause="cancelled")
        stopped.set()
        time.sleep(1)  # the split's failure reaches the interpreter after the stop
        status = str(engine.wait(arn, timeout=60)["status"])
    assert job.merger_actions == []  # no Abort after a stop, either way
    return status


def test_a_stopped_execution_stays_aborted_with_the_patch_and_not_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _stop_while_the_split_runs(monkeypatch, with_patch=True) == "ABORTED"
    # moto as it is lets a task that fails after the stop turn the execution FAILED; if it
    # stops doing so, the patch has nothing left to do and this says so.
    assert _stop_while_the_split_runs(monkeypatch, with_patch=False) == "FAILED"


def test_the_map_and_stop_patches_replace_moto_while_installed() -> None:
    from moto.stepfunctions.parser.asl.component.state.exec.state_map.iteration import (
        distributed_iteration_component as distributed,
    )
    from moto.stepfunctions.parser.asl.eval import environment

    def targets() -> tuple[Any, Any]:
        return (
            distributed.DistributedIterationComponent.__dict__["_map_run"],
            environment.Environment.__dict__["set_error"],
        )

    originals = targets()
    patches = MotoPatches()
    patches.install()
    try:
        assert all(now is not before for now, before in zip(targets(), originals, strict=True))
    finally:
        patches.uninstall()
    assert targets() == originals


# --- ranged GetObject -----------------------------------------------------------------------

OBJECT = bytes(range(256)) * 40  # 10,240 bytes
RANGES = [
    "bytes=0-9",
    "bytes=100-4099",
    "bytes=10000-",
    "bytes=-7",
    "bytes=10235-20000",  # past the end: cut at the end
    "bytes=20000-20010",  # wholly past the end: refused
    "bytes=9-3",  # begin after end: the whole object
    "bytes=0-1,5-6",  # several ranges: the whole object
    "bytes=a-b",  # not a range: the whole object
]


def _ranged_get(s3: Any, range_header: str) -> dict[str, Any]:
    try:
        answer = s3.get_object(Bucket="patched", Key="object", Range=range_header)
    except ClientError as e:
        return {"refused": e.response["Error"]["Code"]}
    return {
        "status": answer["ResponseMetadata"]["HTTPStatusCode"],
        "range": answer.get("ContentRange"),
        "length": answer["ContentLength"],
        "body": answer["Body"].read(),
    }


@pytest.fixture
def s3() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="patched")
        client.put_object(Bucket="patched", Key="object", Body=OBJECT)
        yield client


@pytest.mark.parametrize("range_header", RANGES)
def test_a_ranged_get_answers_as_moto_does(s3: Any, range_header: str) -> None:
    patches = MotoPatches()
    patches.install()
    try:
        patched = _ranged_get(s3, range_header)
        whole = s3.get_object(Bucket="patched", Key="object")["Body"].read()
    finally:
        patches.uninstall()
    assert patched == _ranged_get(s3, range_header)
    assert whole == OBJECT  # a GET without a range is moto's, whole


def _whole_value_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of moto's whole-object reads (``FakeKey.value``) from now on."""
    from moto.s3.models import FakeKey

    reads: list[int] = []
    whole_value = FakeKey.__dict__["value"]

    def counted(key: Any) -> bytes:
        data: bytes = whole_value.fget(key)
        reads.append(len(data))
        return data

    monkeypatch.setattr(FakeKey, "value", property(counted, whole_value.fset))
    return reads


def test_a_ranged_get_reads_only_its_range(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _whole_value_reads(monkeypatch)
    assert _ranged_get(s3, "bytes=0-9")["body"] == OBJECT[:10]
    assert reads == [len(OBJECT)], "moto no longer reads the whole object for a ranged GET"
    reads.clear()
    patches = MotoPatches()
    patches.install()
    try:
        assert _ranged_get(s3, "bytes=0-9")["body"] == OBJECT[:10]
    finally:
        patches.uninstall()
    assert reads == []


# --- large objects a chunk at a time ----------------------------------------------------------

MIB = 2**20
PART = 5 * MIB  # moto's least part size but the last


def _parts(count: int, last: int = 1000) -> list[bytes]:
    return [bytes([number]) * PART for number in range(1, count)] + [b"z" * last]


def _complete(s3: Any, key: str, parts: list[bytes], checksum: dict[str, str], wrong: str) -> Any:
    """A multipart upload of ``parts``, completed as ``wrong`` says: what moto answers."""
    upload = s3.create_multipart_upload(Bucket="patched", Key=key, **checksum)["UploadId"]
    listed = []
    for number, body in enumerate(parts, start=1):
        etag = s3.upload_part(
            Bucket="patched", Key=key, UploadId=upload, PartNumber=number, Body=body
        )["ETag"]
        listed.append({"PartNumber": number, "ETag": etag})
    if wrong == "etag":
        listed[0]["ETag"] = '"' + "0" * 32 + '"'
    elif wrong == "missing part":
        listed.append({"PartNumber": len(parts) + 1, "ETag": listed[0]["ETag"]})
    elif wrong == "small first part":
        listed = listed[::-1]
    try:
        done = s3.complete_multipart_upload(
            Bucket="patched", Key=key, UploadId=upload, MultipartUpload={"Parts": listed}
        )
    except ClientError as e:
        return {"refused": e.response["Error"]["Code"]}
    answer = s3.get_object(Bucket="patched", Key=key, ChecksumMode="ENABLED")
    checksums = {name: value for name, value in answer.items() if name.startswith("Checksum")}
    return {
        "etag": done["ETag"],
        "checksums": checksums,
        "length": answer["ContentLength"],
        "body": answer["Body"].read() == b"".join(parts),
    }


COMPLETIONS = {
    "no checksum": ({}, ""),
    "crc32 composite": ({"ChecksumAlgorithm": "CRC32"}, ""),
    "crc32 full object": ({"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"}, ""),
    "crc32c": ({"ChecksumAlgorithm": "CRC32C"}, ""),
    "crc64nvme": ({"ChecksumAlgorithm": "CRC64NVME"}, ""),
    "sha1": ({"ChecksumAlgorithm": "SHA1"}, ""),
    "sha256": ({"ChecksumAlgorithm": "SHA256"}, ""),
    "wrong etag": ({}, "etag"),
    "missing part": ({}, "missing part"),
    "small part first": ({}, "small first part"),
}


@pytest.mark.parametrize("case", COMPLETIONS)
def test_a_multipart_completion_answers_as_moto_does(s3: Any, case: str) -> None:
    checksum, wrong = COMPLETIONS[case]
    patches = MotoPatches()
    patches.install()
    try:
        patched = _complete(s3, "patched-key", _parts(3), checksum, wrong)
    finally:
        patches.uninstall()
    assert patched == _complete(s3, "moto-key", _parts(3), checksum, wrong)
    assert "refused" in patched or patched["body"]


def _peak_while(action: Callable[[], Any]) -> int:
    """The most bytes of Python objects alive at once while ``action`` ran."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_multipart_completion_holds_no_whole_object(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(64 * 1024))
    size = 16 * 8 * MIB
    uploads = {}
    for name in ("moto", "patched"):
        uploads[name] = s3.create_multipart_upload(Bucket="patched", Key=name)["UploadId"]
        for number in range(1, 17):
            s3.upload_part(
                Bucket="patched",
                Key=name,
                UploadId=uploads[name],
                PartNumber=number,
                Body=bytes([number]) * (8 * MIB),
            )

    def complete(name: str) -> None:
        listed = s3.list_parts(Bucket="patched", Key=name, UploadId=uploads[name])["Parts"]
        s3.complete_multipart_upload(
            Bucket="patched",
            Key=name,
            UploadId=uploads[name],
            MultipartUpload={
                "Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in listed]
            },
        )

    assert _peak_while(lambda: complete("moto")) > size, "moto no longer joins the parts"
    patches = MotoPatches()
    patches.install()
    try:
        assert _peak_while(lambda: complete("patched")) < size / 8
        ranges = [(0, MIB - 1), (size - MIB, size - 1)]
        for start, end in ranges:
            read = s3.get_object(Bucket="patched", Key="patched", Range=f"bytes={start}-{end}")
            assert read["Body"].read() == bytes([1 + start // (8 * MIB)]) * MIB
    finally:
        patches.uninstall()


def _copy_part(s3: Any, key: str, source_range: str) -> Any:
    upload = s3.create_multipart_upload(Bucket="patched", Key=key)["UploadId"]
    copy_range = {"CopySourceRange": source_range} if source_range else {}
    copied = s3.upload_part_copy(
        Bucket="patched",
        Key=key,
        UploadId=upload,
        PartNumber=1,
        CopySource={"Bucket": "patched", "Key": "object"},
        **copy_range,
    )["CopyPartResult"]
    done = s3.complete_multipart_upload(
        Bucket="patched",
        Key=key,
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": copied["ETag"]}]},
    )
    body = s3.get_object(Bucket="patched", Key=key)["Body"].read()
    return {"part": copied["ETag"], "etag": done["ETag"], "body": body}


@pytest.mark.parametrize("source_range", ["bytes=100-4099", "bytes=0-10239", ""])
def test_a_copied_part_answers_as_moto_does(s3: Any, source_range: str) -> None:
    patches = MotoPatches()
    patches.install()
    try:
        patched = _copy_part(s3, "patched-copy", source_range)
    finally:
        patches.uninstall()
    assert patched == _copy_part(s3, "moto-copy", source_range)


def test_a_copied_part_reads_only_its_range(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _whole_value_reads(monkeypatch)
    _copy_part(s3, "moto-copy", "bytes=0-9")
    assert len(OBJECT) in reads, "moto no longer reads the whole source to copy a part"
    reads.clear()
    patches = MotoPatches()
    patches.install()
    try:
        assert _copy_part(s3, "patched-copy", "bytes=0-9")["body"] == OBJECT[:10]
        s3.head_object(Bucket="patched", Key="object")
    finally:
        patches.uninstall()
    assert len(OBJECT) not in reads


@pytest.fixture
def s3_server() -> Iterator[Any]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        client = boto3.client(
            "s3",
            region_name="us-east-1",
            endpoint_url=f"http://{host}:{port}",
            aws_access_key_id="streamed",
            aws_secret_access_key="streamed",
        )
        client.create_bucket(Bucket="patched")
        yield client
    finally:
        server.stop()


def test_a_whole_get_from_the_server_is_sent_a_chunk_at_a_time(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(64 * 1024))
    size = 64 * MIB
    body = bytes(range(256)) * (size // 256)
    s3_server.put_object(Bucket="patched", Key="big", Body=body)
    del body

    def read() -> None:
        answer = s3_server.get_object(Bucket="patched", Key="big")
        assert answer["ContentLength"] == size
        got = 0
        for chunk in answer["Body"].iter_chunks(MIB):
            assert chunk[:4] == bytes(range(4))
            got += len(chunk)
        assert got == size

    assert _peak_while(read) > size, "moto's server no longer reads the whole object"
    patches = MotoPatches(stream_bodies=True)
    patches.install()
    try:
        assert _peak_while(read) < size / 4
    finally:
        patches.uninstall()


# --- the server's dispatcher ------------------------------------------------------------------

SIGNED_FOR = "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20261201/us-east-1/{}/aws4_request, x"
REQUESTS = {
    "dynamodb": {"HTTP_X_AMZ_TARGET": "DynamoDB_20120810.GetItem"},
    "s3": {"PATH_INFO": "/tilefan-tilefanbucket/uploads/a/source"},
    "states": {"HTTP_X_AMZ_TARGET": "AWSStepFunctions.DescribeExecution"},
}


def _environ(service: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "HTTP_HOST": "127.0.0.1:5000",
        "HTTP_AUTHORIZATION": SIGNED_FOR.format(service),
        **REQUESTS[service],
    }


def test_the_dispatcher_finds_each_service_once_and_as_moto_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moto import backends
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from tilefan.local.moto_patches import moto_dispatcher

    listings: list[int] = []
    list_modules = backends.list_of_moto_modules

    def counted() -> Any:
        listings.append(1)
        return list_modules()

    monkeypatch.setattr(backends, "list_of_moto_modules", counted)
    moto, ours = DomainDispatcherApplication(create_backend_app), moto_dispatcher()
    for _ in range(3):
        for service in REQUESTS:
            assert (
                moto.get_application(_environ(service)).name
                == ours.get_application(_environ(service)).name
            )
    moto_listings = len(listings)
    listings.clear()
    for _ in range(3):
        for service in REQUESTS:
            ours.get_application(_environ(service))
    assert moto_listings >= 3 * len(REQUESTS), "moto no longer finds the backend per request"
    assert listings == []


def _requests_left_after_puts(app: Any) -> int:
    """moto's requests still alive after three 1 MiB PUTs answered, the cyclic collector off."""
    from moto.moto_server.werkzeug_app import BackendRequest
    from werkzeug.test import Client

    client = Client(app)
    headers = {"Host": "127.0.0.1:5000", "Authorization": SIGNED_FOR.format("s3")}
    gc.collect()
    gc.disable()
    try:
        for number in range(3):
            client.put(f"/patched/part-{number}", data=b"x" * MIB, headers=headers).close()
        return sum(isinstance(thing, BackendRequest) for thing in gc.get_objects())
    finally:
        gc.enable()


def test_an_answered_request_is_freed_at_once_not_left_to_the_cyclic_collector() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from tilefan.local.moto_patches import moto_dispatcher

    moto = DomainDispatcherApplication(create_backend_app)
    assert _requests_left_after_puts(moto) == 3, "moto's requests no longer wait in cycles"
    assert _requests_left_after_puts(moto_dispatcher()) == 0

"""The embedded storage endpoint answers only requests signed with the engine's own key.

Requests go to `tilefan serve`'s S3, DynamoDB and Step Functions endpoint as anyone on the
machine could send them: unsigned, with made-up or default keys, with a presigned URL whose key,
method, type, length or expiry was changed. Each is refused with the error AWS sends, and
nothing changes behind it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.e2e.support import create, serving, submit
from tests.support import noise_image
from tilefan.local.serve import LocalApi
from tilefan.service.client import TilefanClient

pytestmark = pytest.mark.e2e

OWNER, OTHER = "tf-signed-owner", "tf-signed-other"


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    with serving([OWNER, OTHER], {}) as running:
        yield running


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("signed") / "noise.png"
    noise_image(150, 100, 3, seed=7).pngsave(str(path))
    return path


def send(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One raw HTTP request; returns the status and body whatever the status."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def s3_error(body: bytes) -> str:
    text = body.decode()
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>'), text
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0]


def with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def with_param(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    params = [(k, value if k == name else v) for k, v in parse_qsl(parts.query)]
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def client_with(api: LocalApi, service: str, access_key: str, secret_key: str) -> Any:
    make: Any = boto3.client
    return make(
        service,
        region_name="us-east-1",
        endpoint_url=api.stack.engine.endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(retries={"max_attempts": 1}, signature_version="s3v4"),
    )


def succeeded_job(api: LocalApi, key: str, image: Path, tmp_path: Path) -> dict[str, Any]:
    done = submit(TilefanClient(api.url, key), image, tmp_path / f"{key}.png")
    assert done.job["status"] == "SUCCEEDED", done.job
    return dict(done.job)


def test_the_engine_key_is_random_per_start_and_never_the_default(api: LocalApi) -> None:
    credentials = api.stack.engine.credentials
    assert credentials.access_key.startswith("AKIA") and len(credentials.access_key) == 20
    assert "testing" not in (credentials.access_key, credentials.secret_key)
    assert len(credentials.secret_key) >= 40
    host = urlsplit(api.stack.engine.endpoint_url).hostname
    assert host == "127.0.0.1"


def test_unsigned_requests_are_refused_by_every_service(
    api: LocalApi, image: Path, tmp_path: Path
) -> None:
    engine = api.stack.engine
    job = succeeded_job(api, OWNER, image, tmp_path)
    result_key = f"{engine.bucket}/results/{job['job_id']}/result.png"

    for method, path in [
        ("GET", f"/{engine.bucket}"),
        ("GET", f"/{engine.bucket}?list-type=2"),
        ("GET", f"/{result_key}"),
        ("PUT", f"/{result_key}"),
        ("DELETE", f"/{result_key}"),
        ("GET", "/"),
    ]:
        status, body = send(
            engine.endpoint_url + path, method, b"forged" if method == "PUT" else None
        )
        assert (status, s3_error(body)) == (403, "AccessDenied"), (method, path)

    for target, body in [
        ("DynamoDB_20120810.Scan", {"TableName": engine.table}),
        ("AWSStepFunctions.ListStateMachines", {}),
    ]:
        status, answer = send(
            engine.endpoint_url + "/",
            "POST",
            json.dumps(body).encode(),
            {"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.0"},
        )
        assert status == 400
        assert json.loads(answer)["__type"].endswith("#MissingAuthenticationTokenException")

    # moto's own control API (reset, config) is refused too: nobody can wipe the engine.
    status, _ = send(engine.endpoint_url + "/moto-api/reset", "POST", b"{}")
    assert status == 403
    assert TilefanClient(api.url, OWNER).request("GET", f"/jobs/{job['job_id']}")["status"] == (
        "SUCCEEDED"
    )
    assert api.stack.service.store.size(f"results/{job['job_id']}/result.png") > 0


@pytest.mark.parametrize("access_key", ["testing", "AKIAIOSFODNN7EXAMPLE", "ak"])
def test_made_up_keys_are_refused_by_every_service(api: LocalApi, access_key: str) -> None:
    engine = api.stack.engine
    s3 = client_with(api, "s3", access_key, "testing")
    with pytest.raises(ClientError) as refused:
        s3.list_objects_v2(Bucket=engine.bucket)
    assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    with pytest.raises(ClientError) as refused:
        client_with(api, "dynamodb", access_key, "testing").scan(TableName=engine.table)
    assert refused.value.response["Error"]["Code"] == "UnrecognizedClientException"
    with pytest.raises(ClientError) as refused:
        client_with(api, "stepfunctions", access_key, "testing").list_executions(
            stateMachineArn=engine.state_machine_arn
        )
    assert refused.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_the_engine_key_id_with_a_wrong_secret_is_refused(api: LocalApi) -> None:
    engine = api.stack.engine
    access_key = engine.credentials.access_key
    with pytest.raises(ClientError) as refused:
        client_with(api, "s3", access_key, "not-the-secret").list_objects_v2(Bucket=engine.bucket)
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    for service, call in [
        ("dynamodb", lambda c: c.scan(TableName=engine.table)),
        ("stepfunctions", lambda c: c.list_state_machines()),
    ]:
        with pytest.raises(ClientError) as refused:
            call(client_with(api, service, access_key, "not-the-secret"))
        assert refused.value.response["Error"]["Code"] == "InvalidSignatureException"
    # The engine's own key works: the check refuses strangers, not the engine.
    right = client_with(api, "s3", access_key, engine.credentials.secret_key)
    assert right.list_objects_v2(Bucket=engine.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_a_header_signed_request_with_a_changed_body_is_refused(api: LocalApi) -> None:
    engine = api.stack.engine
    dynamodb = api.stack.engine.client("dynamodb")

    def tamper(request: Any, **_: Any) -> None:
        # Same length, so the request is well formed and only its signature is wrong.
        forged = engine.table[:-1] + ("x" if engine.table[-1] != "x" else "y")
        request.body = request.body.replace(engine.table.encode(), forged.encode())

    dynamodb.meta.events.register_first("before-send.dynamodb.Scan", tamper)
    try:
        with pytest.raises(ClientError) as refused:
            dynamodb.scan(TableName=engine.table)
    finally:
        dynamodb.meta.events.unregister("before-send.dynamodb.Scan", tamper)
    assert refused.value.response["Error"]["Code"] == "InvalidSignatureException"


def test_the_engines_s3_client_leaves_bodies_out_of_its_signature_and_is_accepted(
    api: LocalApi,
) -> None:
    # As botocore does on AWS (HTTPS and a checksum); hashing a 1 GB upload into the
    # signature cost 1.5 s on each side of the engine's plain HTTP.
    engine = api.stack.engine
    s3 = engine.client("s3")
    declared: list[str] = []

    def record(request: Any, **_: Any) -> None:
        declared.append(request.headers["x-amz-content-sha256"])

    s3.meta.events.register("before-send.s3.PutObject", record)
    try:
        s3.put_object(Bucket=engine.bucket, Key="uploads/unsigned-body", Body=b"pixels" * 1000)
    finally:
        s3.meta.events.unregister("before-send.s3.PutObject", record)
    assert declared == [b"UNSIGNED-PAYLOAD"]
    got = s3.get_object(Bucket=engine.bucket, Key="uploads/unsigned-body")["Body"].read()
    assert got == b"pixels" * 1000


def test_a_presigned_upload_is_refused_when_anything_signed_is_changed(api: LocalApi) -> None:
    owner = TilefanClient(api.url, OWNER)
    body = b"x" * 1234
    created = create(owner, len(body), input={"size_bytes": len(body), "content_type": "image/png"})
    other = create(owner, len(body))
    url, headers = created["upload"]["url"], created["upload"]["headers"]
    store = api.stack.service.store
    upload_key = f"uploads/{created['job_id']}/source"
    other_key = f"uploads/{other['job_id']}/source"

    refused = [
        # another key: the key is in the signature
        send(
            with_path(url, urlsplit(url).path.replace(created["job_id"], other["job_id"])),
            "PUT",
            body,
            headers,
        ),
        # another content type
        send(url, "PUT", body, {**headers, "Content-Type": "text/html"}),
        # another length, longer and shorter
        send(url, "PUT", body + b"more", {**headers, "Content-Length": str(len(body) + 4)}),
        send(url, "PUT", body[:-1], {**headers, "Content-Length": str(len(body) - 1)}),
        # another method
        send(url, "GET"),
        send(url, "DELETE"),
        # a longer lifetime, a later date, a forged signature
        send(with_param(url, "X-Amz-Expires", "604800"), "PUT", body, headers),
        send(with_param(url, "X-Amz-Date", "20991231T000000Z"), "PUT", body, headers),
        send(with_param(url, "X-Amz-Signature", "0" * 64), "PUT", body, headers),
        # fewer signed headers
        send(with_param(url, "X-Amz-SignedHeaders", "host"), "PUT", body, headers),
    ]
    for status, answer in refused:
        assert status in (400, 403), answer
        assert s3_error(answer) in (
            "SignatureDoesNotMatch",
            "AccessDenied",
            "AuthorizationHeaderMalformed",
        ), answer
    assert s3_error(refused[0][1]) == "SignatureDoesNotMatch"
    assert store.size(upload_key) is None and store.size(other_key) is None

    assert send(url, "PUT", body, headers)[0] == 200
    assert store.size(upload_key) == len(body)


def test_an_expired_presigned_url_is_refused(api: LocalApi) -> None:
    engine = api.stack.engine
    s3 = engine.client("s3")
    key = "uploads/00000000000000000000000000000000/source"
    url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": engine.bucket, "Key": key}, ExpiresIn=1
    )
    time.sleep(2.1)  # X-Amz-Date has whole seconds: 2 s after it, a 1 s URL has expired
    status, answer = send(url, "PUT", b"late", {"Content-Type": "application/octet-stream"})
    assert (status, s3_error(answer)) == (403, "AccessDenied")
    assert "<Message>Request has expired</Message>" in answer.decode()
    assert api.stack.service.store.size(key) is None


def test_an_upload_url_reused_after_its_job_ended_cannot_change_the_result(
    api: LocalApi, image: Path, tmp_path: Path
) -> None:
    owner = TilefanClient(api.url, OWNER)
    data = image.read_bytes()
    created = create(owner, len(data))
    job_id, upload = created["job_id"], created["upload"]
    assert send(upload["url"], "PUT", data, upload["headers"])[0] == 200
    owner.request("POST", f"/jobs/{job_id}/start")
    ended = owner.follow(job_id, on_progress=None, poll_seconds=0.05)
    assert ended["status"] == "SUCCEEDED", ended
    result_key = f"results/{job_id}/result.png"
    store = api.stack.service.store
    before = store.client.get_object(Bucket=store.bucket, Key=result_key)["Body"].read()

    # S3 accepts a presigned PUT again until it expires; a replay with the same length only
    # rewrites the job's own upload, which the job no longer reads.
    forged = bytes(len(data))
    assert send(upload["url"], "PUT", forged, upload["headers"])[0] == 200
    after = store.client.get_object(Bucket=store.bucket, Key=result_key)["Body"].read()
    assert after == before
    assert owner.request("GET", f"/jobs/{job_id}")["status"] == "SUCCEEDED"
    # Nor can it start the job again.
    status, _ = send(f"{api.url}/jobs/{job_id}/start", "POST", b"", {"x-api-key": OWNER})
    assert status == 409


def test_another_callers_result_is_unreachable_through_storage(
    api: LocalApi, image: Path, tmp_path: Path
) -> None:
    engine = api.stack.engine
    store = api.stack.service.store
    victim = succeeded_job(api, OTHER, image, tmp_path)
    victim_key = f"results/{victim['job_id']}/result.png"
    original = store.client.get_object(Bucket=store.bucket, Key=victim_key)["Body"].read()

    attacker = TilefanClient(api.url, OWNER)
    created = create(attacker, len(original))
    url, headers = created["upload"]["url"], created["upload"]["headers"]
    mine = succeeded_job(api, OWNER, image, tmp_path)
    my_result = attacker.request("GET", f"/jobs/{mine['job_id']}/result?redirect=false")["url"]

    victim_path = f"/{engine.bucket}/{victim_key}"
    attempts = [
        send(with_path(url, victim_path), "PUT", bytes(len(original)), headers),
        send(with_path(my_result, victim_path)),
        send(engine.endpoint_url + victim_path),
        send(engine.endpoint_url + f"/{engine.bucket}?prefix=results/"),
    ]
    for status, answer in attempts:
        assert status == 403, answer
    assert store.client.get_object(Bucket=store.bucket, Key=victim_key)["Body"].read() == original
    # The attacker's own result URL works, for their result only.
    assert send(my_result)[0] == 200

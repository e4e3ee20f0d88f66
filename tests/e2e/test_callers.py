"""Callers and keys, through `tilefan serve`: nobody reaches another's job or another key.

tests/e2e/test_api.py checks that another caller's finished job is invisible on every route;
this module checks the rest of issue 7's fifth point: every job state, no side effects of the
refused calls, requests from several callers at once, presigned URLs scoped to one object, of
one size, for a limited time, sizes refused, and object keys that never come from user input.

moto 5.2.5 does not check SigV4 signatures on presigned requests (nor their expiry): a URL
whose path was changed is accepted by the stand-in. So the scope of a URL is proven here by
recomputing its signature (the AWS algorithm, checked against the URL botocore signed): a
changed key, size, part, method or type no longer matches the signature, which is what S3
refuses with 403 SignatureDoesNotMatch.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import pytest

import tilefan.stages.process
from tests.e2e.support import (
    ROUTES,
    assert_invisible,
    create,
    raw,
    serving,
    submit,
    wait_until_ended,
)
from tests.support import noise_image
from tilefan.imaging.execute import execute_tile
from tilefan.imaging.geometry import Rect
from tilefan.local.serve import LocalApi
from tilefan.service.client import ApiError, TilefanClient, _put
from tilefan.state.storage import keys

pytestmark = pytest.mark.e2e

OWNER, OTHER, THIRD = "tf-callers-owner", "tf-callers-other", "tf-callers-third"
PRESIGN_SECONDS = 120
PART = 5 * 2**20
MAX_INPUT = 12 * 2**20
SETTINGS = {
    "TILEFAN_PRESIGN_SECONDS": str(PRESIGN_SECONDS),
    "TILEFAN_MAX_INPUT_BYTES": str(MAX_INPUT),
    "TILEFAN_MULTIPART_THRESHOLD": str(PART),
    "TILEFAN_MULTIPART_PART_SIZE": str(PART),
}
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
KEY_SHAPES = re.compile(
    r"^(uploads/[0-9a-f]{32}/source|results/[0-9a-f]{32}/result\.[a-z]+"
    r"|jobs/[0-9a-f]{32}/(manifest\.json|(src|out)/\d{6}\.tif))$"
)


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    with serving([OWNER, OTHER, THIRD], SETTINGS) as running:
        yield running


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("callers") / "noise.png"
    noise_image(200, 150, 3, seed=31).pngsave(str(path))
    return path


def bucket_keys(api: LocalApi, prefix: str = "") -> list[str]:
    return api.stack.service.store.list_keys(prefix)


# --- another caller -------------------------------------------------------------------------


def test_another_callers_job_is_404_in_every_state_and_nothing_changes(
    api: LocalApi, image: Path
) -> None:
    owner = TilefanClient(api.url, OWNER)
    created = create(owner, image.stat().st_size)  # CREATED, nothing uploaded
    uploaded = create(owner, image.stat().st_size)  # CREATED, uploaded, not started
    owner.upload(image, uploaded)
    parts = create(owner, 2 * PART + 1)  # CREATED, multipart upload in progress
    failed = create(owner, 10)  # FAILED: ten bytes are not an image
    _put(failed["upload"]["url"], b"not image!", 10, failed["upload"]["headers"])
    owner.request("POST", f"/jobs/{failed['job_id']}/start")
    wait_until_ended(owner, failed["job_id"])
    jobs = {
        "created": created["job_id"],
        "uploaded": uploaded["job_id"],
        "multipart": parts["job_id"],
        "failed": failed["job_id"],
    }
    before = {state: owner.request("GET", f"/jobs/{job}") for state, job in jobs.items()}
    objects = sorted(bucket_keys(api, "uploads/"))

    for state, job_id in jobs.items():
        assert_invisible(api, job_id, OTHER, state)

    # Nothing the other caller sent had an effect: same documents, same objects, not started.
    for state, job_id in jobs.items():
        after = owner.request("GET", f"/jobs/{job_id}")
        assert after == before[state], state
    assert sorted(bucket_keys(api, "uploads/")) == objects
    other_jobs = TilefanClient(api.url, OTHER).request("GET", "/jobs?limit=500")["jobs"]
    assert not {job["job_id"] for job in other_jobs} & set(jobs.values())
    # The owner can still do all of it.
    owner.request("POST", f"/jobs/{uploaded['job_id']}/start")
    assert wait_until_ended(owner, uploaded["job_id"])["status"] == "SUCCEEDED"
    assert owner.request("DELETE", f"/jobs/{created['job_id']}")["deleted"] is True


def test_a_page_cursor_works_only_for_the_caller_it_was_given_to(api: LocalApi) -> None:
    owner = TilefanClient(api.url, OWNER)
    for _ in range(3):
        create(owner, 10)
    page = owner.request("GET", "/jobs?limit=2")
    assert page["next_cursor"]
    status, answer = raw(api, "GET", f"/jobs?limit=2&cursor={page['next_cursor']}", OTHER)
    assert (status, answer["code"]) == (400, "INVALID_REQUEST")


def test_requests_from_many_callers_at_once_each_get_their_own_answer(api: LocalApi) -> None:
    # The API handler is one module; tilefan serve calls it from many threads. Each answer
    # must be about the caller's own job, whatever else is in flight.
    callers = [OWNER, OTHER, THIRD]
    prepared: list[tuple[str, str]] = []
    for number in range(24):
        key = callers[number % len(callers)]
        created = create(TilefanClient(api.url, key), 10)
        _put(created["upload"]["url"], b"0123456789", 10, created["upload"]["headers"])
        prepared.append((key, created["job_id"]))
    barrier = threading.Barrier(len(prepared))

    def start_then_read(entry: tuple[str, str]) -> list[tuple[int, str | None]]:
        key, job_id = entry
        barrier.wait()
        answers = []
        for method, path in [("POST", f"/jobs/{job_id}/start"), ("GET", f"/jobs/{job_id}")]:
            status, answer = raw(api, method, path, key)
            answers.append((status, answer.get("job_id")))
        return answers

    with ThreadPoolExecutor(len(prepared)) as pool:
        answers = list(pool.map(start_then_read, prepared))
    for (_, job_id), pair in zip(prepared, answers, strict=True):
        assert pair == [(202, job_id), (200, job_id)]
    for key in callers:
        listed = TilefanClient(api.url, key).request("GET", "/jobs?limit=500")["jobs"]
        mine = {job_id for owner, job_id in prepared if owner == key}
        theirs = {job_id for owner, job_id in prepared if owner != key}
        assert mine <= {job["job_id"] for job in listed}
        assert not theirs & {job["job_id"] for job in listed}
    for key, job_id in prepared:
        wait_until_ended(TilefanClient(api.url, key), job_id)


def test_a_running_job_is_cancelled_by_its_owner_only_and_never_restarts(
    api: LocalApi, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()

    def held(chain: Any, spec: Any, block: Any, out: Rect) -> Any:
        if out.x or out.y:  # the first tile runs; the others wait until after the cancel
            assert gate.wait(60)
        return execute_tile(chain, spec, block, out)

    monkeypatch.setattr(tilefan.stages.process, "execute_tile", held)
    owner = TilefanClient(api.url, OWNER)
    created = create(owner, image.stat().st_size)
    job_id = created["job_id"]
    owner.upload(image, created)
    owner.request("POST", f"/jobs/{job_id}/start?max_concurrency=4")
    deadline = time.monotonic() + 60
    # A batch records its tiles when it starts (RUNNING) and when it ends: the held batch
    # shows as running.
    while (owner.request("GET", f"/jobs/{job_id}").get("tiles") or {}).get("running", 0) < 1:
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.05)

    assert_invisible(api, job_id, OTHER)  # a running job is as invisible as any other
    assert owner.request("GET", f"/jobs/{job_id}")["status"] == "PROCESSING"
    status, cancelled = raw(api, "DELETE", f"/jobs/{job_id}", OWNER)
    gate.set()
    assert (status, cancelled["status"]) == (202, "CANCELLED")
    for method, path, code in [
        ("POST", f"/jobs/{job_id}/start", "ALREADY_STARTED"),
        ("GET", f"/jobs/{job_id}/result?redirect=false", "RESULT_NOT_READY"),
        ("DELETE", f"/jobs/{job_id}/start", "NOT_FOUND"),
    ]:
        answer_status, answer = raw(api, method, path, OWNER)
        assert answer["code"] == code and answer_status in (404, 409), (method, path)
    execution = str(api.stack.service.jobs.get(job_id).execution_arn)
    api.stack.engine.wait(execution, timeout=60)
    deadline = time.monotonic() + 60
    while bucket_keys(api, keys.job_prefix(job_id)):
        assert time.monotonic() < deadline, "the cancelled job's tiles stayed"
        time.sleep(0.05)
    assert owner.request("GET", f"/jobs/{job_id}")["status"] == "CANCELLED"
    assert bucket_keys(api, f"results/{job_id}/") == []


# --- presigned URLs -------------------------------------------------------------------------


def sigv4_matches(method: str, url: str, headers: Mapping[str, str]) -> bool:
    """Whether a presigned URL's signature is right for this request (AWS SigV4, S3 flavour).

    It is what S3 checks, recomputed from the request and the signing secret: the path as
    sent, every query parameter but the signature, the signed headers and UNSIGNED-PAYLOAD.
    """
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature")
    query = "&".join(
        f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}"
        for name, value in sorted(params.items())
    )
    signed = params["X-Amz-SignedHeaders"].split(";")
    values = {name.lower(): str(value).strip() for name, value in headers.items()}
    values["host"] = parts.netloc
    if any(name not in values for name in signed):
        return False
    canonical = "\n".join(
        [
            method,
            parts.path,
            query,
            "".join(f"{name}:{values[name]}\n" for name in signed),
            ";".join(signed),
            "UNSIGNED-PAYLOAD",
        ]
    )
    access_key, scope = params["X-Amz-Credential"].split("/", 1)
    assert access_key == os.environ["AWS_ACCESS_KEY_ID"]
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + os.environ["AWS_SECRET_ACCESS_KEY"]).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def with_param(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    params = [(k, value if k == name else v) for k, v in parse_qsl(parts.query)]
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def check_lifetime(url: str, expires_at: str | None = None) -> None:
    """The URL lasts the configured time, and expires_at says when that is."""
    params = query_of(url)
    assert params["X-Amz-Expires"] == str(PRESIGN_SECONDS)
    signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if expires_at is not None:
        said = datetime.fromisoformat(expires_at)
        assert abs(said - (signed_at + timedelta(seconds=PRESIGN_SECONDS))) <= timedelta(seconds=2)


def test_upload_url_is_signed_for_one_key_one_size_one_type_and_expires(api: LocalApi) -> None:
    owner = TilefanClient(api.url, OWNER)
    created = create(owner, 1234, input={"size_bytes": 1234, "content_type": "image/png"})
    another = create(owner, 1234)
    job_id, upload = created["job_id"], created["upload"]
    url, headers = upload["url"], upload["headers"]
    bucket = api.stack.engine.bucket
    assert JOB_ID.match(job_id)
    assert urlsplit(url).path == f"/{bucket}/uploads/{job_id}/source"
    assert query_of(url)["X-Amz-SignedHeaders"] == "content-length;content-type;host"
    assert headers == {"Content-Type": "image/png", "Content-Length": "1234"}
    check_lifetime(url, upload["expires_at"])
    assert sigv4_matches("PUT", url, headers)

    other_key = f"/{bucket}/uploads/{another['job_id']}/source"
    for tampered, tampered_headers, method in [
        (with_path(url, other_key), headers, "PUT"),
        (with_path(url, f"/{bucket}/results/{job_id}/result.png"), headers, "PUT"),
        (
            with_path(url, f"/{bucket}/uploads/{job_id}/../{another['job_id']}/source"),
            headers,
            "PUT",
        ),
        (with_path(url, f"/{bucket}/uploads/{job_id}/source2"), headers, "PUT"),
        (url, {**headers, "Content-Length": "1235"}, "PUT"),
        (url, {**headers, "Content-Length": str(5 * 2**30)}, "PUT"),
        (url, {**headers, "Content-Type": "text/html"}, "PUT"),
        (url, headers, "GET"),
        (url, headers, "DELETE"),
        (with_param(url, "X-Amz-Expires", "604800"), headers, "PUT"),
    ]:
        assert not sigv4_matches(method, tampered, tampered_headers), (method, tampered)


def test_part_urls_are_signed_for_their_own_part_and_length(api: LocalApi) -> None:
    owner = TilefanClient(api.url, OWNER)
    size = 2 * PART + 1000
    multipart = create(owner, size)["multipart"]
    parts = multipart["parts"]
    assert [part["part_number"] for part in parts] == [1, 2, 3]
    lengths = [PART, PART, 1000]
    for part, length in zip(parts, lengths, strict=True):
        url = part["url"]
        check_lifetime(url, multipart["expires_at"])
        assert sigv4_matches("PUT", url, {"Content-Length": str(length)})
        assert not sigv4_matches("PUT", url, {"Content-Length": str(length + 1)})
        assert not sigv4_matches(
            "PUT", with_param(url, "partNumber", "4"), {"Content-Length": str(length)}
        )
        assert not sigv4_matches(
            "PUT", with_param(url, "uploadId", "another-upload"), {"Content-Length": str(length)}
        )
    assert sum(lengths) == size


def test_result_url_is_signed_for_this_jobs_result_only(
    api: LocalApi, image: Path, tmp_path: Path
) -> None:
    owner = TilefanClient(api.url, OWNER)
    done = submit(owner, image, tmp_path / "out.png")
    job_id = done.job["job_id"]
    link = owner.request("GET", f"/jobs/{job_id}/result?redirect=false")
    bucket = api.stack.engine.bucket
    assert urlsplit(link["url"]).path == f"/{bucket}/results/{job_id}/result.png"
    assert query_of(link["url"])["response-content-disposition"] == (
        f'attachment; filename="{job_id}.png"'
    )
    check_lifetime(link["url"], link["expires_at"])
    assert sigv4_matches("GET", link["url"], {})
    assert not sigv4_matches(
        "GET", with_path(link["url"], f"/{bucket}/uploads/{job_id}/source"), {}
    )
    assert not sigv4_matches("PUT", link["url"], {})
    assert not sigv4_matches(
        "GET", with_param(link["url"], "response-content-disposition", "inline"), {}
    )


# --- sizes ----------------------------------------------------------------------------------


def test_declared_size_above_the_configured_maximum_is_refused_at_create(api: LocalApi) -> None:
    body = b'{"operations": [], "input": {"size_bytes": %d}}'
    status, answer = raw(api, "POST", "/jobs", OWNER, body % (MAX_INPUT + 1))
    assert (status, answer["code"]) == (413, "INPUT_TOO_LARGE")
    assert f"{MAX_INPUT:,}" in answer["message"]
    assert raw(api, "POST", "/jobs", OWNER, body % MAX_INPUT)[0] == 201


def test_an_upload_bigger_than_declared_is_refused_at_start_and_nothing_runs(
    api: LocalApi, image: Path
) -> None:
    owner = TilefanClient(api.url, OWNER)
    created = create(owner, 10)
    data = image.read_bytes()
    # The length is signed, so the storage endpoint refuses the PUT itself, as S3 does.
    with pytest.raises(ApiError) as put_refused:
        _put(
            created["upload"]["url"], data, len(data), {"Content-Type": "application/octet-stream"}
        )
    assert "SignatureDoesNotMatch" in str(put_refused.value)
    assert bucket_keys(api, f"uploads/{created['job_id']}/") == []
    # An upload of another size that got there some other way is refused at start.
    store = api.stack.service.store
    store.client.put_object(
        Bucket=store.bucket, Key=f"uploads/{created['job_id']}/source", Body=data
    )
    with pytest.raises(ApiError) as refused:
        owner.request("POST", f"/jobs/{created['job_id']}/start")
    assert (refused.value.status, refused.value.code) == (409, "UPLOAD_MISMATCH")
    job = owner.request("GET", f"/jobs/{created['job_id']}")
    assert job["status"] == "CREATED"
    assert api.stack.service.jobs.get(created["job_id"]).execution_arn is None
    owner.request("DELETE", f"/jobs/{created['job_id']}")
    # The merger's cleanup removes the upload, invoked asynchronously by the DELETE.
    deadline = time.monotonic() + 60
    while bucket_keys(api, f"uploads/{created['job_id']}/") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert bucket_keys(api, f"uploads/{created['job_id']}/") == []


# --- keys never come from user input --------------------------------------------------------

TRICKY_IDS = [
    "..",
    "..%2F..",
    "%2e%2e%2f%2e%2e",
    "..%2F..%2Fuploads",
    "{victim}%2F..%2F{victim}",
    "{victim}%2F",
    "{victim}%00",
    "{victim}..",
    "%2Fjobs%2F{victim}",
    "*",
    "a" * 65,
    "{victim_upper}",
]


def test_path_tricks_in_job_ids_reach_no_key(api: LocalApi, image: Path, tmp_path: Path) -> None:
    owner = TilefanClient(api.url, OWNER)
    victim = submit(owner, image, tmp_path / "o.png").job["job_id"]
    victim_keys = sorted(
        bucket_keys(api, f"uploads/{victim}/") + bucket_keys(api, f"results/{victim}/")
    )
    assert len(victim_keys) == 2
    for caller in (OTHER, OWNER):
        for pattern in TRICKY_IDS:
            tricky = pattern.format(victim=victim, victim_upper=victim.upper())
            for method, route, body in ROUTES:
                status, answer = raw(api, method, route.format(id=tricky), caller, body)
                assert status in (400, 404), (caller, method, route, tricky, status, answer)
                assert answer.get("code") in ("JOB_NOT_FOUND", "NOT_FOUND", "INVALID_REQUEST")
    assert (
        sorted(bucket_keys(api, f"uploads/{victim}/") + bucket_keys(api, f"results/{victim}/"))
        == victim_keys
    )
    assert owner.request("GET", f"/jobs/{victim}")["status"] == "SUCCEEDED"


def test_user_text_never_reaches_an_object_key(api: LocalApi) -> None:
    owner = TilefanClient(api.url, OWNER)
    created = owner.request(
        "POST",
        "/jobs",
        {
            "operations": [],
            "input": {"size_bytes": 10, "content_type": "../../results/x/result.png"},
        },
        {"Idempotency-Key": "../../uploads/other/source"},
    )
    job_id = created["job_id"]
    assert JOB_ID.match(job_id)
    assert urlsplit(created["upload"]["url"]).path.endswith(f"/uploads/{job_id}/source")
    # The text is a header value only, and the signature pins it.
    assert created["upload"]["headers"]["Content-Type"] == "../../results/x/result.png"


def test_every_object_in_the_bucket_has_a_generated_key(api: LocalApi) -> None:
    # Runs last: everything the module's requests wrote has one of the pipeline's key shapes.
    stray = [key for key in bucket_keys(api) if not KEY_SHAPES.match(key)]
    assert stray == []

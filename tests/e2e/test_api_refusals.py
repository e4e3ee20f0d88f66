"""What the API refuses, and that every refusal is a JSON code and sentence, never a page."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.support import raw, serving
from tilefan.errors import InvalidChain
from tilefan.imaging.operations import parse_chain
from tilefan.local.serve import LocalApi
from tilefan.service.request_limits import MAX_JSON_DEPTH

pytestmark = pytest.mark.e2e

KEY = "tf-test-refusals"
VALID: dict[str, Any] = {"operations": [{"op": "invert"}], "input": {"size_bytes": 10}}


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    with serving([KEY], {}) as running:
        yield running


def send(
    api: LocalApi, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One request with exactly these headers (Host included); the status, headers and JSON."""
    host, port = api.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(
            method,
            path,
            body=body,
            headers={"x-api-key": KEY, "Content-Type": "application/json", **headers},
        )
        response = connection.getresponse()
        answer = response.read()
        kind = response.getheader("Content-Type", "")
        assert kind.startswith("application/json"), (response.status, kind, answer[:200])
        return response.status, dict(response.getheaders()), json.loads(answer)
    finally:
        connection.close()


def with_fields(**changes: Any) -> bytes:
    body = json.loads(json.dumps(VALID))
    for path, value in changes.items():
        *parents, name = path.split("__")
        target = body
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 100_000])
def test_deeply_nested_json_is_a_400(api: LocalApi, depth: int) -> None:
    nested = b'{"operations": ' + b"[" * depth + b"]" * depth + b', "input": {"size_bytes": 5}}'
    status, answer = raw(api, "POST", "/jobs", KEY, nested)
    assert (status, answer["code"]) == (400, "BAD_JSON"), answer


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tile_size", "256"),
        ("input__size_bytes", "1000"),
        ("output__pyramid", "yes"),
        ("output__quality", "90"),
        ("output__pyramid", 1),
        ("tile_size", 256.0),
    ],
)
def test_fields_take_their_own_type_never_a_string_or_number_that_looks_like_it(
    api: LocalApi, field: str, value: Any
) -> None:
    status, answer = raw(api, "POST", "/jobs", KEY, with_fields(**{field: value}))
    assert (status, answer["code"]) == (400, "INVALID_REQUEST"), answer
    assert answer["field"] == field.replace("__", ".")


@pytest.mark.parametrize(
    "content_type", ["image/png\r\nX-Injected: 1", "image/png\nX-Injected: 1", "image/png\r", ""]
)
def test_a_content_type_that_is_not_one_header_line_is_refused(
    api: LocalApi, content_type: str
) -> None:
    status, answer = raw(api, "POST", "/jobs", KEY, with_fields(input__content_type=content_type))
    assert (status, answer["code"]) == (400, "INVALID_REQUEST")
    assert answer["field"] == "input.content_type"


def test_a_plain_content_type_is_sent_back_as_the_upload_header(api: LocalApi) -> None:
    body = with_fields(input__content_type="image/tiff; charset=binary")
    status, answer = raw(api, "POST", "/jobs", KEY, body)
    assert status == 201
    assert answer["upload"]["headers"]["Content-Type"] == "image/tiff; charset=binary"


def test_links_never_come_from_the_host_header(api: LocalApi) -> None:
    status, headers, created = send(
        api, "POST", "/jobs", json.dumps(VALID).encode(), Host="evil.example"
    )
    assert status == 201
    job_id = created["job_id"]
    assert created["links"]["self"] == f"/jobs/{job_id}"
    assert all(link.startswith(f"/jobs/{job_id}") for link in created["links"].values())
    assert headers["Location"] == f"/jobs/{job_id}"
    _, _, document = send(api, "GET", f"/jobs/{job_id}", Host="evil.example")
    assert "evil.example" not in json.dumps(document)


def test_a_100000_character_path_is_a_json_414(api: LocalApi) -> None:
    status, _, answer = send(api, "GET", "/jobs/" + "a" * 100_000)
    assert status == 414
    assert answer["code"] == "REQUEST_URI_TOO_LONG" and answer["message"]


def test_a_body_over_api_gateways_10_mb_is_a_json_413(api: LocalApi) -> None:
    host, port = api.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        # Refused on the declared length, before a byte of the body is read.
        connection.putrequest("POST", "/jobs")
        connection.putheader("x-api-key", KEY)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(10 * 2**20 + 1))
        connection.endheaders()
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert (response.status, answer["code"]) == (413, "PAYLOAD_TOO_LARGE")
    assert response.getheader("Connection") == "close"


@pytest.mark.parametrize(
    "operations",
    [[{"op": "nosuch"}], [{"op": "gaussblur", "sigma": -1}], [{"op": "median", "size": "big"}]],
)
def test_a_chain_error_reads_as_the_chain_validator_words_it(
    api: LocalApi, operations: list[dict[str, Any]]
) -> None:
    with pytest.raises(InvalidChain) as refused:
        parse_chain(operations)
    status, answer = raw(api, "POST", "/jobs", KEY, with_fields(operations=operations))
    assert (status, answer["code"]) == (400, "INVALID_CHAIN")
    assert answer["message"] == str(refused.value)
    assert "Input tag" not in answer["message"]


@pytest.mark.parametrize(
    ("output", "sentence"),
    [
        ({"format": "dzi", "tile_size": 255}, "even tile size"),
        ({"format": "iiif", "overlap": 2}, "IIIF tiles have no overlap"),
        ({"format": "dz", "tile_size": 64, "overlap": 40}, "overlap must be from 0 to 32"),
    ],
)
def test_tile_set_options_that_cannot_be_written_are_refused_at_creation(
    api: LocalApi, output: dict[str, Any], sentence: str
) -> None:
    status, _, answer = send(api, "POST", "/jobs", json.dumps({**VALID, "output": output}).encode())
    assert (status, answer["code"]) == (400, "INVALID_TILE_SET"), answer
    assert sentence in answer["message"]

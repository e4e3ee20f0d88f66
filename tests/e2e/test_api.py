"""The REST API served by `tilefan serve` on loopback, driven by a real HTTP client."""

from __future__ import annotations

import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

from tests.e2e.support import assert_invisible, create, raw, serving, submit, wait_until_ended
from tests.support import assert_identical, noise_image
from tilefan.local.serve import LocalApi
from tilefan.service.client import ApiError, TilefanClient

pytestmark = pytest.mark.e2e

KEY, OTHER_KEY = "tf-test-owner", "tf-test-other"
PART = 5 * 2**20
"""S3's smallest multipart part; the server is started with this as threshold and part size."""


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    settings = {"TILEFAN_MULTIPART_THRESHOLD": str(PART), "TILEFAN_MULTIPART_PART_SIZE": str(PART)}
    with serving([KEY, OTHER_KEY], settings) as running:
        yield running


@pytest.fixture
def client(api: LocalApi) -> TilefanClient:
    return TilefanClient(api.url, KEY)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "noise.png"
    noise_image(400, 300, 3, seed=11).pngsave(str(path))
    return path


def test_whole_flow_result_equals_libvips_and_counts_rise_to_the_total(
    client: TilefanClient, source: Path, tmp_path: Path
) -> None:
    ops: list[dict[str, Any]] = [{"op": "gaussblur", "sigma": 2}, {"op": "rot", "angle": "d270"}]
    seen: list[tuple[int, int]] = []

    def record(job: Any) -> None:
        if job.get("tiles"):
            seen.append((job["tiles"]["done"], job["tiles"]["total"]))

    output = tmp_path / "out.png"
    done = submit(client, source, output, operations=ops, on_progress=record)
    expected = pyvips.Image.new_from_file(str(source)).gaussblur(2).rot("d270")
    assert_identical(expected, pyvips.Image.new_from_file(str(output)))
    total = done.job["tiles"]["total"]
    assert total == 5 * 7
    counts = [d for d, _ in seen]
    assert counts == sorted(counts), "tile counts went down"
    assert seen[-1] == (total, total)
    assert done.job["tiles"]["grid"] == ["D" * 5] * 7


def test_progress_svg_has_one_cell_per_tile(
    api: LocalApi, client: TilefanClient, source: Path, tmp_path: Path
) -> None:
    done = submit(client, source, tmp_path / "o.png")
    request = urllib.request.Request(
        f"{api.url}/jobs/{done.job['job_id']}/progress.svg", headers={"x-api-key": KEY}
    )
    with urllib.request.urlopen(request) as response:
        assert response.headers["Content-Type"].startswith("image/svg+xml")
        root = ET.fromstring(response.read())
    cells = root.findall("{http://www.w3.org/2000/svg}rect")
    assert len(cells) == done.job["tiles"]["total"] == 7 * 5


def test_multipart_upload_end_to_end(client: TilefanClient, tmp_path: Path) -> None:
    image = noise_image(2200, 1800, 3, seed=5)
    source = tmp_path / "big.tif"
    image.tiffsave(str(source))
    assert source.stat().st_size > 2 * PART
    created = create(client, source.stat().st_size)
    assert created["upload"] is None
    assert len(created["multipart"]["parts"]) == 3
    client.upload(source, created)
    client.request("POST", f"/jobs/{created['job_id']}/start")
    job = wait_until_ended(client, created["job_id"])
    assert job["status"] == "SUCCEEDED", job.get("error")
    client.download(created["job_id"], tmp_path / "out.png")
    assert_identical(image.invert(), pyvips.Image.new_from_file(str(tmp_path / "out.png")))


def test_part_urls_are_signed_on_demand_and_the_client_asks_for_them(
    client: TilefanClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the first part comes with the job; the client signs parts 2 and 3 when it gets to
    # them, as it does past the hundredth part of a large upload.
    import tilefan.service.job_service

    monkeypatch.setattr(tilefan.service.job_service, "PARTS_AT_CREATION", 1)
    asked: list[Any] = []
    real_request = client.request

    def request(method: str, path: str, body: Any = None, headers: Any = None) -> Any:
        if path.endswith("/upload/parts"):
            asked.append(body)
        return real_request(method, path, body, headers)

    monkeypatch.setattr(client, "request", request)
    image = noise_image(2200, 1800, 3, seed=6)
    source = tmp_path / "big.tif"
    image.tiffsave(str(source))
    created = create(client, source.stat().st_size)
    multipart = created["multipart"]
    assert (multipart["part_count"], [p["part_number"] for p in multipart["parts"]]) == (3, [1])
    assert multipart["parts_url"].endswith(f"/jobs/{created['job_id']}/upload/parts")
    client.upload(source, created)
    assert asked == [{"part_numbers": [2, 3]}]
    client.request("POST", f"/jobs/{created['job_id']}/start")
    job = wait_until_ended(client, created["job_id"])
    assert job["status"] == "SUCCEEDED", job.get("error")


def test_signing_parts_outside_the_upload_is_refused(client: TilefanClient) -> None:
    created = create(client, 2 * PART + 1)
    signed = client.request(
        "POST", f"/jobs/{created['job_id']}/upload/parts", {"part_numbers": [3, 1]}
    )
    assert [part["part_number"] for part in signed["parts"]] == [3, 1]
    assert all("partNumber=" in part["url"] for part in signed["parts"])
    for numbers in ([4], [0]):
        with pytest.raises(ApiError) as refused:
            client.request(
                "POST", f"/jobs/{created['job_id']}/upload/parts", {"part_numbers": numbers}
            )
        assert (refused.value.status, refused.value.code) == (400, "INVALID_REQUEST")
    small = create(client, 10)
    with pytest.raises(ApiError) as single:
        client.request("POST", f"/jobs/{small['job_id']}/upload/parts", {"part_numbers": [1]})
    assert (single.value.status, single.value.code) == (409, "UPLOAD_MISMATCH")


def test_preflight_needs_no_api_key_and_answers_for_the_allowed_origin(api: LocalApi) -> None:
    request = urllib.request.Request(
        f"{api.url}/jobs",
        method="OPTIONS",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, content-type",
        },
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 204
        headers = {name.lower(): value for name, value in response.headers.items()}
    assert headers["access-control-allow-origin"] == "*"
    assert "x-api-key" in headers["access-control-allow-headers"].lower()
    assert "POST" in headers["access-control-allow-methods"]


def test_answers_carry_cors_headers_for_web_pages(api: LocalApi) -> None:
    request = urllib.request.Request(
        f"{api.url}/jobs", headers={"x-api-key": KEY, "Origin": "https://app.example.com"}
    )
    with urllib.request.urlopen(request) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_max_concurrency_above_the_workers_reserved_concurrency_is_refused(
    client: TilefanClient,
) -> None:
    created = create(client, 10)
    with pytest.raises(ApiError) as refused:
        client.request("POST", f"/jobs/{created['job_id']}/start?max_concurrency=101")
    assert (refused.value.status, refused.value.code) == (400, "INVALID_REQUEST")
    assert "reserved concurrency" in refused.value.message


def test_idempotency_key_returns_the_same_job(client: TilefanClient) -> None:
    body = {"operations": [], "input": {"size_bytes": 10}}
    first = client.request("POST", "/jobs", body, {"Idempotency-Key": "retry-me"})
    second = client.request("POST", "/jobs", body, {"Idempotency-Key": "retry-me"})
    third = client.request("POST", "/jobs", body, {"Idempotency-Key": "another"})
    assert first["job_id"] == second["job_id"] != third["job_id"]
    with pytest.raises(ApiError) as reused:
        client.request("POST", "/jobs", {**body, "tile_size": 128}, {"Idempotency-Key": "retry-me"})
    assert (reused.value.status, reused.value.code) == (422, "IDEMPOTENCY_KEY_REUSED")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "BAD_JSON"),
        (b'{"operations": [{"op": "blur"}], "input": {"size_bytes": 5}}', 400, "INVALID_CHAIN"),
        (
            b'{"operations": [{"op": "gaussblur", "sigma": 0}], "input": {"size_bytes": 5}}',
            400,
            "INVALID_CHAIN",
        ),
        (
            b'{"operations": [], "input": {"size_bytes": 5}, "tile_size": 32}',
            400,
            "INVALID_REQUEST",
        ),
        (b'{"operations": []}', 400, "INVALID_REQUEST"),
        (b'{"operations": [], "input": {"size_bytes": 999999999999999}}', 413, "INPUT_TOO_LARGE"),
        (
            b'{"operations": [], "output": {"format": "jpeg"},'
            b' "input": {"size_bytes": 5, "width": 70000, "height": 100}}',
            400,
            "OUTPUT_TOO_LARGE",
        ),
        (
            b'{"operations": [{"op": "resize", "scale": 2}], "output": {"format": "webp"},'
            b' "input": {"size_bytes": 5, "width": 9000, "height": 100}}',
            400,
            "OUTPUT_TOO_LARGE",
        ),
    ],
)
def test_bad_create_requests_answer_with_a_code_and_a_sentence(
    api: LocalApi, body: bytes, status: int, code: str
) -> None:
    answer_status, answer = raw(api, "POST", "/jobs", KEY, body)
    assert (answer_status, answer["code"]) == (status, code)
    assert answer["message"]
    assert "Traceback" not in answer["message"]


def test_validation_error_names_the_field(api: LocalApi) -> None:
    body = b'{"operations": [{"op": "median", "size": "big"}], "input": {"size_bytes": 5}}'
    _, answer = raw(api, "POST", "/jobs", KEY, body)
    assert answer["field"] == "operations.0.median.size"


def test_start_refuses_a_missing_upload_a_size_mismatch_and_a_second_start(
    client: TilefanClient, source: Path
) -> None:
    created = create(client, source.stat().st_size)
    job_id = created["job_id"]
    with pytest.raises(ApiError) as missing:
        client.request("POST", f"/jobs/{job_id}/start")
    assert (missing.value.status, missing.value.code) == (409, "UPLOAD_MISSING")

    # The declared length is signed: storage refuses another, as S3 does, and nothing starts.
    wrong = create(client, source.stat().st_size + 1)
    with pytest.raises(ApiError) as refused:
        client.upload(source, wrong)
    assert (refused.value.status, refused.value.code) == (403, "UPLOAD_REFUSED")
    with pytest.raises(ApiError) as mismatch:
        client.request("POST", f"/jobs/{wrong['job_id']}/start")
    assert (mismatch.value.status, mismatch.value.code) == (409, "UPLOAD_MISSING")

    client.upload(source, created)
    client.request("POST", f"/jobs/{job_id}/start")
    with pytest.raises(ApiError) as twice:
        client.request("POST", f"/jobs/{job_id}/start")
    assert (twice.value.status, twice.value.code) == (409, "ALREADY_STARTED")
    wait_until_ended(client, job_id)


def test_result_before_success_is_409(client: TilefanClient) -> None:
    created = create(client, 100)
    with pytest.raises(ApiError) as early:
        client.request("GET", f"/jobs/{created['job_id']}/result?redirect=false")
    assert (early.value.status, early.value.code) == (409, "RESULT_NOT_READY")


def test_wrong_or_missing_key_is_refused(api: LocalApi) -> None:
    assert raw(api, "GET", "/jobs", "not-a-key")[0] == 403
    assert raw(api, "GET", "/jobs", None)[0] == 403


def test_another_callers_job_is_invisible_on_every_route(
    api: LocalApi, client: TilefanClient, source: Path, tmp_path: Path
) -> None:
    done = submit(client, source, tmp_path / "o.png", tile_size=128)
    job_id = done.job["job_id"]
    assert_invisible(api, job_id, OTHER_KEY)
    other_jobs = TilefanClient(api.url, OTHER_KEY).request("GET", "/jobs")["jobs"]
    assert job_id not in {job["job_id"] for job in other_jobs}
    assert client.request("GET", f"/jobs/{job_id}")["status"] == "SUCCEEDED"


def test_tiles_are_paginated_and_filtered_by_state(
    client: TilefanClient, source: Path, tmp_path: Path
) -> None:
    done = submit(client, source, tmp_path / "o.png")
    job_id = done.job["job_id"]
    first = client.request("GET", f"/jobs/{job_id}/tiles?limit=20&state=DONE")
    rest = client.request("GET", f"/jobs/{job_id}/tiles?limit=20&cursor={first['next_cursor']}")
    indices = [t["index"] for t in first["tiles"] + rest["tiles"]]
    assert indices == list(range(35))
    assert rest["next_cursor"] is None
    assert all(t["attempts"] == 1 and t["duration_ms"] is not None for t in first["tiles"])
    assert client.request("GET", f"/jobs/{job_id}/tiles?state=FAILED")["tiles"] == []


def test_delete_removes_a_finished_job(client: TilefanClient, source: Path, tmp_path: Path) -> None:
    done = submit(client, source, tmp_path / "o.png", tile_size=128)
    job_id = done.job["job_id"]
    assert client.request("DELETE", f"/jobs/{job_id}") == {"job_id": job_id, "deleted": True}
    with pytest.raises(ApiError) as gone:
        client.request("GET", f"/jobs/{job_id}")
    assert gone.value.status == 404


def test_result_redirects_to_a_presigned_download(
    api: LocalApi, client: TilefanClient, source: Path, tmp_path: Path
) -> None:
    done = submit(client, source, tmp_path / "o.png", tile_size=128)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(
        f"{api.url}/jobs/{done.job['job_id']}/result", headers={"x-api-key": KEY}
    )
    with pytest.raises(urllib.error.HTTPError) as redirected:
        opener.open(request)
    assert redirected.value.code == 302
    location = redirected.value.headers["Location"]
    assert "X-Amz-Expires=" in location and "X-Amz-Signature=" in location
    with urllib.request.urlopen(location) as response:
        assert response.read() == (tmp_path / "o.png").read_bytes()


def test_a_tile_set_job_gives_its_descriptor_url_and_its_tiles_prefix(
    api: LocalApi, client: TilefanClient, source: Path, tmp_path: Path
) -> None:
    descriptor = tmp_path / "o.dzi"
    done = client.submit(
        source, descriptor, [{"op": "invert"}], output_format="dzi", poll_seconds=0.1
    )
    output = done.job["output"]
    job_id = done.job["job_id"]
    assert output["key"] == f"results/{job_id}/result.dzi"
    assert output["prefix"] == f"results/{job_id}/result_files/"
    # 400 x 300 in 254 px tiles with overlap: 4 tiles at full resolution, then 1 per level.
    assert output["tiles"] == 4 + 9
    image = ET.fromstring(descriptor.read_bytes())
    size = image.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert size is not None and (size.get("Width"), size.get("Height")) == ("400", "300")
    tiles = api.stack.service.store.list_keys(output["prefix"])
    assert len(tiles) == output["tiles"]
    assert f"{output['prefix']}9/1_1.jpeg" in tiles

"""The job page in a real headless Chromium: live progress, the result viewer, refused links.

The browser is Debian's `chromium` (`make test` installs it when missing), driven by
Playwright with that executable; Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

import tilefan.stages.process
import tilefan.stages.statistics
from tests.e2e.support import serving, wait_until_ended
from tests.support import libvips_error, noise_image
from tilefan.local.serve import LocalApi
from tilefan.service.client import TilefanClient
from tilefan.service.job_page import ViewLinks

pytestmark = pytest.mark.e2e

KEY = "tf-page-owner"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "img"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_or_skip() -> Any:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        if os.environ.get("TILEFAN_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (`make browser` installs it)")
    return sync_api


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    with serving([KEY], {}) as running:
        yield running


@pytest.fixture
def client(api: LocalApi) -> TilefanClient:
    return TilefanClient(api.url, KEY)


class SlowTiles:
    """Holds every tile for a moment, so a page opened mid-run sees the count rise."""

    def __init__(self, seconds: float, fail_tile: int | None = None) -> None:
        self.seconds = seconds
        self.fail_tile = fail_tile
        self.real = tilefan.stages.process.execute_tile

    def __call__(self, chain: Any, spec: Any, block: Any, out: Any) -> Any:
        # Later tiles take longer, so batches (whose tiles are recorded together) end apart.
        time.sleep(self.seconds * (1 + out.y / 64 + out.x / 512))
        if self.fail_tile is not None and (out.x, out.y) == (0, 0):
            # With its detail: a bare pyvips.Error takes libvips' process-wide error buffer,
            # where another thread may have left a line (`libvips_error`).
            raise libvips_error("injected failure for the page's failed state")
        return self.real(chain, spec, block, out)


def start_job(
    client: TilefanClient,
    tmp_path: Path,
    output_format: str = "png",
    operations: list[dict[str, Any]] | None = None,
    *,
    preview: bool = False,
) -> dict[str, Any]:
    """A 512 x 384 job in 64-pixel tiles (48), started; ``preview`` (the API's default) makes
    a TIFF, JPEG, PNG or WebP result's output tiles 256 pixels (4) and gives it a preview."""
    source = tmp_path / "noise.png"
    noise_image(512, 384, 3, seed=5).pngsave(str(source))
    created = client.request(
        "POST",
        "/jobs",
        {
            "operations": operations or [{"op": "gaussblur", "sigma": 1.5}],
            "output": {"format": output_format, "preview": preview},
            "tile_size": 64,
            "input": {"size_bytes": source.stat().st_size},
        },
    )
    client.upload(source, created)
    client.request("POST", f"/jobs/{created['job_id']}/start")
    document: dict[str, Any] = client.request("GET", f"/jobs/{created['job_id']}")
    return document


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def with_token(url: str, token: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode({"token": token})))


def absolute(api: LocalApi, link: str) -> str:
    """The API's links are root-relative: the address a browser opens."""
    return urllib.parse.urljoin(api.url + "/", link)


def main_data(page: Any) -> dict[str, str]:
    values: dict[str, str] = page.eval_on_selector(
        "main",
        "m => ({status: m.dataset.jobStatus, done: m.dataset.tilesDone,"
        " total: m.dataset.tilesTotal, stats_done: m.dataset.statsDone,"
        " stats_total: m.dataset.statsTotal,"
        " text: document.getElementById('status').textContent})",
    )
    return values


def screenshot(page: Any, name: str) -> None:
    if os.environ.get("TILEFAN_WRITE_DOCS"):
        DOCS_IMAGES.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS_IMAGES / name), full_page=True)


def test_page_shows_tiles_rising_then_draws_the_result_with_no_foreign_request(
    api: LocalApi,
    client: TilefanClient,
    browser: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tilefan.stages.process, "execute_tile", SlowTiles(0.15))
    job = start_job(client, tmp_path)
    view = absolute(api, job["links"]["view"])
    assert view.startswith(api.url + f"/jobs/{job['job_id']}/view?token=")

    page = browser.new_page(viewport={"width": 1000, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(view)
    # Selectors, not wait_for_function: the page's CSP allows no eval, Playwright's included.
    page.wait_for_selector('main:not([data-tiles-total="0"])')
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        data = main_data(page)
        seen.append(int(data["done"]))
        mid_run = data["status"] == "PROCESSING" and 0 < seen[-1] < int(data["total"])
        if mid_run and len(set(seen)) == 2:  # the first count between none and all
            screenshot(page, "job-page-running.png")
        if data["status"] == "SUCCEEDED":
            break
        time.sleep(0.2)
    data = main_data(page)
    assert data["status"] == "SUCCEEDED"
    assert data["done"] == data["total"] == "48"  # 512 x 384 in 64-pixel tiles
    assert seen == sorted(seen), seen  # never goes back
    assert [count for count in seen if 0 < count < 48], f"no count seen mid-run: {seen}"

    viewer_draws(page)

    api_origin = urllib.parse.urlsplit(api.url).netloc
    foreign = [url for url in requests if urllib.parse.urlsplit(url).netloc != api_origin]
    # The page and its script load from the API alone; only the result's own presigned
    # download (the viewer's image) comes from storage.
    assert all(f"/results/{job['job_id']}/" in url for url in foreign), foreign
    page.close()


def viewer_draws(page: Any) -> None:
    page.wait_for_selector("#viewer canvas", timeout=30_000)
    time.sleep(1.5)  # the viewer fades its image in
    shot = pyvips.Image.new_from_buffer(page.locator("#viewer").screenshot(), "")
    # The viewer's background is near black (17); the result is blurred noise, mid-grey.
    assert shot.avg() > 60, "the viewer drew nothing"


@pytest.mark.parametrize("output_format", ["dzi", "iiif"])
def test_page_draws_a_tile_set_result_through_the_api_alone(
    api: LocalApi, client: TilefanClient, browser: Any, tmp_path: Path, output_format: str
) -> None:
    job = start_job(client, tmp_path, output_format=output_format)
    wait_until_ended(client, job["job_id"])
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(absolute(api, job["links"]["view"]))
    page.wait_for_selector('main[data-job-status="SUCCEEDED"]')
    viewer_draws(page)
    tiles = [url for url in requests if "/view/set/" in url]
    assert tiles, requests
    api_origin = urllib.parse.urlsplit(api.url).netloc
    assert all(urllib.parse.urlsplit(url).netloc == api_origin for url in requests), requests
    if output_format == "dzi":
        screenshot(page, "job-page-tile-set.png")
    page.close()

    view = absolute(api, job["links"]["view"])
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(view).query)["token"][0]
    one_tile = with_token(view.replace("/view?", "/view/set/9/0/0?"), token)
    with urllib.request.urlopen(one_tile) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert pyvips.Image.new_from_buffer(response.read(), "").width > 0
    other = start_job(client, tmp_path)
    wait_until_ended(client, other["job_id"])
    other_token = urllib.parse.parse_qs(urllib.parse.urlsplit(other["links"]["view"]).query)
    for refused in (
        with_token(view.replace("/view?", "/view/set/9/0/0?"), other_token["token"][0]),
        with_token(view.replace("/view?", "/view/set/10/0/0?"), token),  # beyond full size
        with_token(view.replace("/view?", "/view/set/9/99/0?"), token),
        with_token(view.replace("/view?", "/view/set/9/..%2F..%2Fx/0?"), token),
        # a png result without a preview has no set to view
        with_token(
            absolute(api, other["links"]["view"]).replace("/view?", "/view/set?"),
            other_token["token"][0],
        ),
    ):
        assert status_of(refused) in (400, 404), refused


PREVIEW_SCREENSHOTS = {"tiff": "job-page-preview.png", "png": "job-page-succeeded.png"}
"""A TIFF's page, which only the preview can show, and a PNG's, the page of a default job."""


@pytest.mark.parametrize("output_format", ["tiff", "png", "jpeg", "webp"])
def test_page_shows_a_results_preview_and_offers_the_download(
    api: LocalApi, client: TilefanClient, browser: Any, tmp_path: Path, output_format: str
) -> None:
    job = start_job(client, tmp_path, output_format=output_format, preview=True)
    ended = wait_until_ended(client, job["job_id"])
    assert ended["output"]["preview"]["key"].endswith("/preview/result.dzi"), ended["output"]
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(absolute(api, job["links"]["view"]))
    page.wait_for_selector('main[data-job-status="SUCCEEDED"]')
    assert main_data(page)["total"] == "4"  # 256-pixel output tiles: whole preview tiles
    viewer_draws(page)
    assert page.locator("#download").is_visible()
    assert page.locator("#download").get_attribute("href").startswith("view/result?")
    assert [url for url in requests if "/view/set/" in url], requests
    # The viewer reads the preview's tiles through the API, not the result from storage.
    api_origin = urllib.parse.urlsplit(api.url).netloc
    assert all(urllib.parse.urlsplit(url).netloc == api_origin for url in requests), requests
    if output_format in PREVIEW_SCREENSHOTS:
        screenshot(page, PREVIEW_SCREENSHOTS[output_format])
    page.close()


def test_page_follows_the_statistics_pass_then_the_processing_tiles(
    api: LocalApi,
    client: TilefanClient,
    browser: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = tilefan.stages.statistics.tile_statistics

    def slow(plan: Any, block: Any, tile: Any, *, histogram: bool) -> Any:
        time.sleep(0.3 * (1 + tile.index / 8))  # batches end apart, as in SlowTiles
        return real(plan, block, tile, histogram=histogram)

    monkeypatch.setattr(tilefan.stages.statistics, "tile_statistics", slow)
    job = start_job(client, tmp_path, operations=[{"op": "hist_equal"}])
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(absolute(api, job["links"]["view"]))
    page.wait_for_selector('main:not([data-job-status=""])')
    during: list[tuple[int, str]] = []
    svg_titles: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        data = main_data(page)
        if data["status"] == "STATISTICS" and data["stats_total"] != "0":
            during.append((int(data["stats_done"]), data["text"]))  # read together
            assert data["stats_total"] == "48" and data["done"] == "0", data
            assert page.locator('#stages li[data-stage="stats"]').is_visible()
            if not svg_titles:  # progress.svg draws the pass too, while the job is in it
                request = urllib.request.Request(
                    f"{api.url}/jobs/{job['job_id']}/progress.svg", headers={"x-api-key": KEY}
                )
                with urllib.request.urlopen(request) as response:
                    svg = response.read().decode()
                if ": STATISTICS" in svg:  # the page's last poll may be a second behind
                    svg_titles.append(svg)
        if data["status"] == "SUCCEEDED":
            break
        time.sleep(0.2)
    assert main_data(page)["status"] == "SUCCEEDED"
    counts = [done for done, _ in during]
    assert [done for done in counts if 0 < done < 48], f"no pass count seen mid-run: {during}"
    assert counts == sorted(counts), counts  # never goes back
    odd = [text for _, text in during if "statistics pass 1 of 1" not in text]
    assert not odd, odd
    assert svg_titles and "statistics pass before step 0" in svg_titles[0], svg_titles
    final = main_data(page)
    assert (final["done"], final["total"], final["stats_done"]) == ("48", "48", "0")
    page.close()


def test_failed_job_shows_its_code_and_the_failed_tile(
    api: LocalApi,
    client: TilefanClient,
    browser: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tilefan.stages.process, "execute_tile", SlowTiles(0.0, fail_tile=0))
    job = start_job(client, tmp_path)
    wait_until_ended(client, job["job_id"])
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(absolute(api, job["links"]["view"]))
    page.wait_for_selector('main[data-job-status="FAILED"]')
    assert page.locator("#error-code").inner_text() == "TILE_FAILED"
    assert "injected failure" in page.locator("#error-message").inner_text()
    failed_cell = page.evaluate(
        "() => { const g = document.getElementById('grid');"
        " const columns = Number(g.dataset.columns);"
        " const x = Math.floor(g.width / columns / 2);"  # the top middle of tile 0
        " const d = g.getContext('2d').getImageData(x, 2, 1, 1).data; return [d[0], d[1], d[2]]; }"
    )
    assert failed_cell[0] > 150 and failed_cell[1] < 100, failed_cell  # tile 0 drawn failed
    screenshot(page, "job-page-failed.png")
    page.close()


def test_forged_expired_and_other_jobs_links_get_404(
    api: LocalApi, client: TilefanClient, tmp_path: Path
) -> None:
    first = start_job(client, tmp_path)
    second = start_job(client, tmp_path)
    for job in (first, second):
        wait_until_ended(client, job["job_id"])
    view = absolute(api, first["links"]["view"])
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(view).query)["token"][0]
    assert status_of(view) == 200
    assert status_of(with_token(view, token).replace("/view?", "/view/state?")) == 200

    secret = api.stack.engine.template.secrets["ViewLinkSecret"].encode()
    expired = ViewLinks(secret, 60).token(first["job_id"], first_owner(api, first), now=0)
    other_jobs = urllib.parse.parse_qs(urllib.parse.urlsplit(second["links"]["view"]).query)
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for bad in (forged, expired, other_jobs["token"][0], "", "1.x"):
        for route in ("/view?", "/view/state?", "/view/tiles?", "/view/result?"):
            assert status_of(with_token(view, bad).replace("/view?", route)) in (404, 400), (
                bad,
                route,
            )
    wrong_job = view.replace(first["job_id"], second["job_id"])
    assert status_of(wrong_job) == 404


def first_owner(api: LocalApi, job: dict[str, Any]) -> str:
    return str(api.stack.service.jobs.get(job["job_id"]).owner)


def test_page_link_needs_no_api_key_but_other_routes_still_do(
    api: LocalApi, client: TilefanClient, tmp_path: Path
) -> None:
    job = start_job(client, tmp_path)
    wait_until_ended(client, job["job_id"])
    assert status_of(absolute(api, job["links"]["view"])) == 200
    assert status_of(absolute(api, job["links"]["self"])) == 403
    static = api.url + f"/jobs/{job['job_id']}/view/static/job.js"
    assert status_of(static) == 200
    assert status_of(api.url + f"/jobs/{job['job_id']}/view/static/../app.py") == 404


def test_concurrent_pages_do_not_slow_the_job_beyond_a_few_requests_a_second(
    api: LocalApi,
    client: TilefanClient,
    browser: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tilefan.stages.process, "execute_tile", SlowTiles(0.05))
    job = start_job(client, tmp_path)
    page = browser.new_page()
    data_requests: list[str] = []
    page.on(
        "request",
        lambda request: data_requests.append(request.url) if "/view/" in request.url else None,
    )
    started = time.monotonic()
    page.goto(absolute(api, job["links"]["view"]))
    page.wait_for_selector(
        'main[data-job-status="SUCCEEDED"], main[data-job-status="FAILED"]', timeout=120_000
    )
    elapsed = max(1.0, time.monotonic() - started)
    assert len(data_requests) / elapsed <= 3, (len(data_requests), elapsed)
    page.close()

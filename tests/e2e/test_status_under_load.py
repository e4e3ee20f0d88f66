"""Status reads while 8 jobs of hundreds of tiles run at once through `tilefan serve`.

Each job has its own poller reading `GET /jobs/{id}` as a client would; every read's latency is
recorded, and every job should be seen mid-run (some tiles done, not all): the test reports
XFAIL while that is not met. The latencies are printed (p50, p95, max), not asserted: CI
machines differ. Figures from one run are in
docs/reliability.md. ``serve_api`` with API processes runs every function in processes of its
own, as ``tilefan serve`` does; ``TILEFAN_LOAD_API_PROCESSES=0`` runs every handler in the
engine's process instead (the API one request at a time), for comparison.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import NO_PREVIEW
from tests.support import noise_image
from tilefan.local.serve import LocalApi, serve_api
from tilefan.service.client import TilefanClient

pytestmark = pytest.mark.e2e

JOBS = 8
KEYS = [f"tf-status-{number}" for number in range(JOBS)]
TILE = 64
SIDE = int(os.environ.get("TILEFAN_LOAD_SIDE", "640"))
"""A 640 px square in 64 px tiles: 100 tiles per job, 800 in all (more with the variable)."""
API_PROCESSES = int(os.environ.get("TILEFAN_LOAD_API_PROCESSES", "4"))
HANG = 1800
"""Seconds after which a job that has not ended counts as hung (a guard, not a timing)."""


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    with serve_api(port=0, keys=KEYS, api_processes=API_PROCESSES) as running:
        yield running


def start_job(api: LocalApi, key: str, source: Path) -> str:
    client = TilefanClient(api.url, key, timeout=HANG)
    created = client.request(
        "POST",
        "/jobs",
        {
            "operations": [{"op": "gaussblur", "sigma": 1.5}],
            "output": {"format": "png", **NO_PREVIEW},
            "tile_size": TILE,
            "input": {"size_bytes": source.stat().st_size},
        },
    )
    client.upload(source, created)
    client.request("POST", f"/jobs/{created['job_id']}/start")
    return str(created["job_id"])


def test_status_reads_answer_and_show_progress_while_eight_jobs_run(
    api: LocalApi, tmp_path: Path
) -> None:
    sources = []
    for number in range(JOBS):
        source = tmp_path / f"input-{number}.png"
        noise_image(SIDE, SIDE, 3, seed=500 + number).pngsave(str(source))
        sources.append(source)
    with ThreadPoolExecutor(JOBS) as pool:
        job_ids = list(
            pool.map(lambda pair: start_job(api, *pair), zip(KEYS, sources, strict=True))
        )

    latencies: list[float] = []
    mid_run: dict[str, dict[str, Any]] = {}
    ended: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def poll(key: str, job_id: str) -> None:
        client = TilefanClient(api.url, key, timeout=HANG)
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            asked = time.perf_counter()
            job = client.request("GET", f"/jobs/{job_id}")
            took = time.perf_counter() - asked
            tiles = job.get("tiles") or {}
            with lock:
                latencies.append(took)
                if 0 < tiles.get("done", 0) < tiles.get("total", 0):
                    mid_run.setdefault(job_id, tiles)
            if job["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                ended[job_id] = job
                return
            time.sleep(0.2)

    with ThreadPoolExecutor(JOBS) as pool:
        list(pool.map(lambda pair: poll(*pair), zip(KEYS, job_ids, strict=True)))

    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    print(
        f"\nstatus reads with {JOBS} jobs running, {API_PROCESSES} API processes: "
        f"{len(ordered)} reads, p50 {statistics.median(ordered):.3f} s, "
        f"p95 {p95:.3f} s, max {ordered[-1]:.3f} s"
    )
    failed = {
        job_id: job.get("error") for job_id, job in ended.items() if job["status"] != "SUCCEEDED"
    }
    assert set(ended) == set(job_ids) and not failed, failed
    for job in ended.values():
        assert job["tiles"]["done"] == job["tiles"]["total"] == (SIDE // TILE) ** 2
    # Progress was seen mid-run for every job, not only its start and its end. With handlers in
    # threads, a status read waits on moto's server, which shares the engine's process (and
    # its GIL) with every tile worker (docs/reliability.md, "Status reads under load").
    if set(mid_run) != set(job_ids):
        pytest.xfail(f"progress seen mid-run for {len(mid_run)} of {JOBS} jobs")

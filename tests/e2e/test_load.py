"""Load: many jobs submitted at once through `tilefan serve`, every result checked.

CI runs 20 small jobs from four callers at once (one tile each: a TIFF result's work tiles are
at least 256 px, docs/operations.md). A larger run is one
variable away: ``TILEFAN_LOAD_JOBS=100 .venv/bin/pytest tests/e2e/test_load.py`` (sizes grow
with ``TILEFAN_LOAD_SCALE``); the benchmark harness measures throughput, this checks
correctness under load: every output equals whole-image libvips, every count is exact, every
caller sees exactly their jobs, and nothing is left in storage once the jobs are deleted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
import pyvips
from boto3.dynamodb.conditions import Attr

from tests.support import assert_identical, noise_image
from tilefan import ImageSpec, parse_chain, plan_tiles
from tilefan.local.serve import LocalApi, serve_api
from tilefan.service.client import Submission, TilefanClient
from tilefan.stages.tiff_output import output_tile_rule

pytestmark = pytest.mark.e2e

JOBS = int(os.environ.get("TILEFAN_LOAD_JOBS", "20"))
SCALE = float(os.environ.get("TILEFAN_LOAD_SCALE", "1"))
KEYS = [f"tf-load-{letter}" for letter in "abcd"]
TILE = 64
HANG = 1800
"""Seconds after which a job that has not ended counts as hung (a guard, not a timing)."""
POLL = 0.25 * max(1.0, JOBS / 20)
"""Seconds between status polls. `tilefan serve` answers one request at a time and a status
read costs about 0.1 s on moto, so more jobs poll less often to leave the API some room."""

CHAINS: list[list[dict[str, Any]]] = [
    [{"op": "gaussblur", "sigma": 1.2}, {"op": "invert"}],
    [{"op": "rot", "angle": "d90"}, {"op": "median", "size": 3}],
    [{"op": "flip", "direction": "vertical"}, {"op": "sobel"}],
    [{"op": "sharpen"}, {"op": "shrink", "hshrink": 2, "vshrink": 2}],
    [{"op": "conv", "mask": [[1, 2, 1], [2, 4, 2], [1, 2, 1]], "scale": 16}],
]


@dataclass(frozen=True)
class Order:
    """One job of the load: who sends what, and what must come back."""

    key: str
    source: Path
    ops: list[dict[str, Any]]
    image: pyvips.Image

    @property
    def tiles(self) -> int:
        plan = plan_tiles(
            ImageSpec.of(self.image),
            parse_chain(self.ops),
            TILE,
            output_tile_rule=output_tile_rule("tiff", {}),
        )
        return plan.tile_count

    def expected(self) -> pyvips.Image:
        return reduce(lambda im, step: step.apply(im), parse_chain(self.ops), self.image)


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    with serve_api(port=0, keys=KEYS) as running:
        yield running


@pytest.fixture(scope="module")
def orders(tmp_path_factory: pytest.TempPathFactory) -> list[Order]:
    folder = tmp_path_factory.mktemp("load")
    made = []
    for number in range(JOBS):
        width = int((120 + 23 * (number % 5)) * SCALE)
        height = int((90 + 17 * (number % 4)) * SCALE)
        bands = (1, 3, 4)[number % 3]
        fmt = "ushort" if number % 4 == 3 else "uchar"
        image = noise_image(width, height, bands, fmt, seed=100 + number)
        source = folder / f"input-{number:03d}.tif"
        image.tiffsave(str(source))
        made.append(Order(KEYS[number % len(KEYS)], source, CHAINS[number % len(CHAINS)], image))
    return made


def test_jobs_submitted_at_once_all_complete_exactly(
    api: LocalApi, orders: list[Order], tmp_path: Path
) -> None:
    def submit(numbered: tuple[int, Order]) -> Submission:
        number, order = numbered
        client = TilefanClient(api.url, order.key, timeout=HANG)
        return client.submit(
            order.source,
            tmp_path / f"output-{number:03d}.tif",
            order.ops,
            output_format="tiff",
            tile_size=TILE,
            poll_seconds=POLL,
        )

    with ThreadPoolExecutor(len(orders)) as pool:
        futures = [pool.submit(submit, numbered) for numbered in enumerate(orders)]
        done = [future.result(timeout=HANG) for future in futures]

    # Every job succeeded with the result libvips gives on the whole image.
    for order, submission in zip(orders, done, strict=True):
        assert submission.job["status"] == "SUCCEEDED", submission.job.get("error")
        assert_identical(order.expected(), pyvips.Image.new_from_file(str(submission.output)))

    # Counts are exact: every tile once, done once, nothing failed or retried.
    for order, submission in zip(orders, done, strict=True):
        client = TilefanClient(api.url, order.key)
        tiles = submission.job["tiles"]
        assert (tiles["total"], tiles["done"], tiles["failed"]) == (order.tiles, order.tiles, 0)
        records = client.request("GET", f"/jobs/{submission.job['job_id']}/tiles?limit=500")
        assert [t["index"] for t in records["tiles"]] == list(range(order.tiles))
        assert all(t["state"] == "DONE" and t["attempts"] == 1 for t in records["tiles"])

    # Each caller lists exactly the jobs they sent.
    for key in KEYS:
        listed = TilefanClient(api.url, key).request("GET", "/jobs?limit=500")["jobs"]
        sent = {s.job["job_id"] for o, s in zip(orders, done, strict=True) if o.key == key}
        assert {job["job_id"] for job in listed} == sent

    # Nothing is left behind: no intermediates once the executions end, and nothing at all
    # once deleted.
    store, table = api.stack.service.store, api.stack.service.jobs.table
    for submission in done:
        api.stack.settle(submission.job["job_id"])
    assert store.list_keys("jobs/") == []
    for order, submission in zip(orders, done, strict=True):
        job_id = submission.job["job_id"]
        deleted = TilefanClient(api.url, order.key).request("DELETE", f"/jobs/{job_id}")
        assert deleted == {"job_id": job_id, "deleted": True}

    # The merger removes a deleted job's objects and tile items, invoked asynchronously.
    def left() -> tuple[list[str], list[Any]]:
        items = table.scan(FilterExpression=Attr("pk").begins_with("JOB#"))["Items"]
        return store.list_keys(""), items

    deadline = time.monotonic() + 60
    while left() != ([], []) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left() == ([], [])
    sfn = api.stack.engine.client("stepfunctions")
    running = sfn.list_executions(
        stateMachineArn=api.stack.engine.state_machine_arn, statusFilter="RUNNING"
    )
    assert running["executions"] == []

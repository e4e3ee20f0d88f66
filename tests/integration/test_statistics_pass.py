"""Statistics passes on the embedded engine: whole-image steps and the stats output."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pyvips

import tilefan.stages.statistics
from tests.support import assert_identical, libvips_error, noise_image, whole
from tilefan.local.stack import LOCAL_OWNER, LocalStack, run_job
from tilefan.service.schema import job_document
from tilefan.state.jobs import JobStatus
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration


@pytest.fixture
def skewed_source(tmp_path: Path) -> Path:
    """A 16-bit image whose values crowd at the dark end, saved losslessly."""
    rng = np.random.default_rng(4)
    pixels = np.clip(rng.exponential(1.0, (230, 310, 3)) ** 2 * 300 + 900, 0, 65535)
    path = tmp_path / "skewed.tif"
    pyvips.Image.new_from_array(pixels.astype(np.uint16)).copy(
        interpretation="rgb16"
    ).write_to_file(str(path))
    return path


CHAINS = [
    [{"op": "hist_equal"}],
    [
        {"op": "gaussblur", "sigma": 1.5},
        {"op": "scale"},
        {"op": "hist_local", "width": 9, "height": 9},
    ],
    [{"op": "hist_equal", "band": 2}, {"op": "median", "size": 3}, {"op": "scale", "log": True}],
]


@pytest.mark.parametrize("ops", CHAINS, ids=lambda ops: "+".join(s["op"] for s in ops))
def test_whole_image_steps_through_the_pipeline_equal_libvips(
    stack: LocalStack, skewed_source: Path, tmp_path: Path, ops: list[dict[str, Any]]
) -> None:
    output = tmp_path / "out.tif"
    view = run_job(
        stack, skewed_source, output, ops, output_format="tiff", tile_size=64, poll_seconds=0.05
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert {"stats", "process", "merge"} <= set(view.job.timings)
    expected = whole(pyvips.Image.new_from_file(str(skewed_source)), ops)
    assert_identical(expected, pyvips.Image.new_from_file(str(output)))
    assert stack.service.store.list_keys(keys.job_prefix(view.job.job_id)) == []


def test_a_chain_without_whole_image_steps_has_no_statistics_pass(
    stack: LocalStack, skewed_source: Path, tmp_path: Path
) -> None:
    view = run_job(
        stack,
        skewed_source,
        tmp_path / "out.tif",
        [{"op": "invert"}],
        output_format="tiff",
        tile_size=128,
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert "stats" not in view.job.timings


@pytest.mark.parametrize(
    "ops", [[], [{"op": "hist_equal"}, {"op": "gaussblur", "sigma": 2}]], ids=["none", "chain"]
)
def test_stats_output_is_libvips_stats_of_the_result(
    stack: LocalStack, skewed_source: Path, tmp_path: Path, ops: list[dict[str, Any]]
) -> None:
    output = tmp_path / "stats.json"
    view = run_job(
        stack, skewed_source, output, ops, output_format="stats", tile_size=64, poll_seconds=0.05
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert "stats" in view.job.timings and "process" not in view.job.timings
    document = json.loads(output.read_text())
    result = whole(pyvips.Image.new_from_file(str(skewed_source)), ops)
    reference = np.array(result.stats().tolist())
    for expected, row in zip(reference, [document["all"], *document["per_band"]], strict=True):
        assert (row["min"], row["max"]) == (expected[0], expected[1])
        np.testing.assert_allclose(
            [row["sum"], row["sum2"], row["mean"], row["deviation"]], expected[2:6], rtol=1e-9
        )
    histogram = result.hist_find().numpy().reshape(-1, result.bands).T.tolist()
    assert document["histogram"] == histogram
    assert stack.service.store.list_keys(keys.job_prefix(view.job.job_id)) == []


def test_a_small_noise_image_with_hist_equal_in_the_map(stack: LocalStack, tmp_path: Path) -> None:
    source = tmp_path / "noise.png"
    noise_image(200, 150, 1, "uchar", 9).write_to_file(str(source))
    output = tmp_path / "out.tif"
    ops = [{"op": "sobel"}, {"op": "hist_equal"}]
    view = run_job(
        stack, source, output, ops, output_format="tiff", tile_size=64, poll_seconds=0.05
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert_identical(
        whole(pyvips.Image.new_from_file(str(source)), ops), pyvips.Image.new_from_file(str(output))
    )


def test_a_failing_statistics_tile_fails_the_job_and_removes_intermediates(
    stack: LocalStack, skewed_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tilefan.stages.statistics.tile_statistics

    def broken(plan: Any, block: Any, tile: Any, *, histogram: bool) -> Any:
        if tile.index == 3:
            raise libvips_error("injected: libvips ran out of memory")
        return real(plan, block, tile, histogram=histogram)

    monkeypatch.setattr(tilefan.stages.statistics, "tile_statistics", broken)
    output = tmp_path / "out.tif"
    view = run_job(
        stack,
        skewed_source,
        output,
        [{"op": "hist_equal"}],
        output_format="tiff",
        tile_size=64,
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.FAILED
    assert view.job.error is not None and "injected" in view.job.error["message"]
    assert view.job.error["code"] == "TILE_FAILED"
    assert stack.service.store.list_keys(keys.job_prefix(view.job.job_id)) == []
    assert not output.exists()


def test_a_status_read_during_a_statistics_pass_shows_its_tiles_done(
    stack: LocalStack, skewed_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first pass's first batch (tiles 0-3) runs; every later statistics tile waits.
    opened = threading.Event()
    real = tilefan.stages.statistics.tile_statistics

    def held(plan: Any, block: Any, tile: Any, *, histogram: bool) -> Any:
        if tile.index >= 4:
            assert opened.wait(60), "the test never let the pass go on"
        return real(plan, block, tile, histogram=histogram)

    monkeypatch.setattr(tilefan.stages.statistics, "tile_statistics", held)
    service = stack.service
    ops = [{"op": "hist_equal"}, {"op": "scale"}]  # two passes, one per whole-image step
    job = service.create(
        LOCAL_OWNER,
        ops,
        "png",
        tile_size=64,
        input_info={"size_bytes": skewed_source.stat().st_size},
    )
    service.store.upload(skewed_source, keys.upload(job.job_id), "image/tiff")
    service.start(LOCAL_OWNER, job.job_id, max_concurrency=4)
    try:
        deadline = time.monotonic() + 60
        while not (view := service.view(LOCAL_OWNER, job.job_id)).passes.get(0, None) or (
            view.passes[0].done < 4
        ):
            assert time.monotonic() < deadline, f"no statistics tile was shown done: {view.job}"
            time.sleep(0.05)

        requests: Counter[str] = Counter()
        events = service.jobs.resource.meta.client.meta.events
        count = lambda model, **kwargs: requests.update([model.name])  # noqa: E731
        events.register("before-call.dynamodb", count)
        try:
            view = service.view(LOCAL_OWNER, job.job_id)
        finally:
            events.unregister("before-call.dynamodb", count)
        # The passes' letters come in the same band items: still two requests.
        assert requests == Counter({"GetItem": 1, "BatchGetItem": 1}), requests
        document = job_document(view.job, view.progress, "", passes=view.passes)
        under_way = view.pass_under_way()  # what the CLI bar and progress.svg draw
    finally:
        opened.set()

    assert document.status is JobStatus.STATISTICS and document.stage == "stats"
    first, second = document.statistics
    assert (first.before_step, first.total, first.done) == (0, 20, 4)
    assert (first.rows, first.columns, first.pixels) == (4, 5, 310 * 230)
    assert first.grid[0] == "DDDDP" and set("".join(first.grid[1:])) == {"P"}
    assert (second.before_step, second.done, second.pending) == (1, 0, 20)
    assert document.tiles is not None and document.tiles.done == 0  # processing has not begun
    assert under_way is not None and under_way[0]["upto"] == 0 and under_way[1].done == 4

    execution = stack.engine.wait(str(service.jobs.get(job.job_id).execution_arn), timeout=120)
    assert execution["status"] == "SUCCEEDED"
    view = service.view(LOCAL_OWNER, job.job_id)
    finished = job_document(view.job, view.progress, "", passes=view.passes)
    assert [(p.before_step, p.done) for p in finished.statistics] == [(0, 20), (1, 20)]
    assert finished.tiles is not None and finished.tiles.done == finished.tiles.total

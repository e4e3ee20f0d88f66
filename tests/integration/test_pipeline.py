"""The whole pipeline on the embedded engine: the template's state machine and handlers on moto."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

import tilefan.stages.merge
import tilefan.stages.pipeline
import tilefan.stages.process
import tilefan.stages.split
from tests.support import assert_identical, libvips_error, noise_image, shared_image, whole
from tilefan import TransientError
from tilefan.formats.source import upright
from tilefan.local.stack import LocalStack, run_job
from tilefan.state.jobs import TERMINAL, JobStatus, TileState
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration


def leftovers(stack: LocalStack, job_id: str) -> list[str]:
    return stack.service.store.list_keys(keys.job_prefix(job_id))


def run(
    stack: LocalStack, source: Path, tmp_path: Path, ops: list[dict[str, Any]], **options: Any
) -> tuple[Any, Path]:
    output = tmp_path / f"out.{options.pop('ext', 'tif')}"
    fmt = {"tif": "tiff", "png": "png"}[output.suffix[1:]]
    view = run_job(stack, source, output, ops, output_format=fmt, poll_seconds=0.05, **options)
    return view, output


CHAINS = [
    [{"op": "gaussblur", "sigma": 2.5}, {"op": "sharpen"}, {"op": "median", "size": 3}],
    [{"op": "rot", "angle": "d90"}, {"op": "sobel"}, {"op": "shrink", "hshrink": 2, "vshrink": 2}],
    [{"op": "flip", "direction": "horizontal"}, {"op": "linear", "a": 0.5, "b": 10}],
]


@pytest.mark.parametrize("ops", CHAINS, ids=lambda ops: "+".join(s["op"] for s in ops))
@pytest.mark.parametrize(
    ("name", "tile_size"),
    [
        # Shipped in tests/images: these run in every clone.
        ("camera.png", 128),
        ("chelsea.png", 100),
        ("rocket.jpg", 96),
        # From ../shared/images, where it is present.
        ("sample.jpg", 64),
        ("sample.png", 100),
        ("rotation-6.jpg", 128),
    ],
)
def test_run_equals_whole_image_libvips(
    stack: LocalStack, tmp_path: Path, name: str, tile_size: int, ops: list[dict[str, Any]]
) -> None:
    source = shared_image(name)
    view, output = run(stack, source, tmp_path, ops, tile_size=tile_size)
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    expected = whole(upright(pyvips.Image.new_from_file(str(source))), ops)
    assert_identical(expected, pyvips.Image.new_from_file(str(output)))
    assert view.progress is not None
    assert view.progress.done == view.progress.total == view.job.grid["tile_count"]
    assert leftovers(stack, view.job.job_id) == []


def test_hundreds_of_tiles_through_the_distributed_map(stack: LocalStack, tmp_path: Path) -> None:
    image = noise_image(1300, 1100, 3, seed=7)
    source = tmp_path / "noise.png"
    image.pngsave(str(source))
    ops = [{"op": "gaussblur", "sigma": 1.5}, {"op": "median", "size": 3}]
    view, output = run(stack, source, tmp_path, ops, tile_size=64, concurrency=8, ext="png")
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert view.job.grid["tile_count"] == 21 * 18
    assert view.progress is not None and view.progress.grid == "D" * (21 * 18)
    assert_identical(whole(image, ops), pyvips.Image.new_from_file(str(output)))


def test_a_streamed_result_of_a_rotated_grid_equals_the_whole_image(
    stack: LocalStack, tmp_path: Path
) -> None:
    # 8 columns and 11 rows of 64 px tiles after the rotation, a narrower last column and a
    # shorter last row, 16-bit with alpha: the png is encoded a row of tiles at a time.
    image = noise_image(700, 500, 4, fmt="ushort", seed=5)
    source = tmp_path / "noise.tif"
    image.tiffsave(str(source))
    ops = [{"op": "sharpen"}, {"op": "rot", "angle": "d270"}]
    # png: a tiff result is assembled from the workers' encoded tiles, without this join.
    view, output = run(stack, source, tmp_path, ops, tile_size=64, ext="png")
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert (view.job.grid["columns"], view.job.grid["rows"]) == (8, 11)
    assert_identical(whole(image, ops), pyvips.Image.new_from_file(str(output)))


def test_progress_is_read_at_most_every_progress_seconds_and_at_the_end(
    stack: LocalStack, tmp_path: Path, small_source: Path
) -> None:
    seen: list[Any] = []
    view = run_job(
        stack,
        small_source,
        tmp_path / "out.png",
        [{"op": "invert"}],
        output_format="png",
        tile_size=64,
        poll_seconds=0.01,
        progress_seconds=3600,
        on_progress=seen.append,
    )
    assert view.job.status is JobStatus.SUCCEEDED
    # Once when following starts, once when the job ends: not on each of the many polls.
    assert len(seen) == 2 and seen[0].job.status not in TERMINAL
    assert seen[1].job.status is JobStatus.SUCCEEDED and seen[1].progress is not None
    assert seen[1].progress.done == seen[-1].progress.total == view.job.grid["tile_count"]


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """What the handlers' Powertools logger writes, as it formats it."""
    powertools = logging.getLogger("tilefan")
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(powertools.handlers[0].formatter)
    powertools.addHandler(handler)
    yield captured
    powertools.removeHandler(handler)


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    path = tmp_path / "small.png"
    noise_image(300, 200, 3, seed=3).pngsave(str(path))
    return path


def test_worker_failing_for_good_fails_the_job_and_removes_intermediates(
    stack: LocalStack,
    tmp_path: Path,
    small_source: Path,
    monkeypatch: pytest.MonkeyPatch,
    json_logs: io.StringIO,
) -> None:
    real = tilefan.stages.process.execute_tile

    def broken(chain: Any, spec: Any, block: Any, out: Any) -> Any:
        if out.x == 64 and out.y == 64:
            raise libvips_error("injected: libvips ran out of memory")
        return real(chain, spec, block, out)

    monkeypatch.setattr(tilefan.stages.process, "execute_tile", broken)
    view, output = run(stack, small_source, tmp_path, [{"op": "invert"}], tile_size=64, ext="png")
    assert view.job.status is JobStatus.FAILED
    assert view.job.error is not None and view.job.error["code"] == "TILE_FAILED"
    assert "injected" in view.job.error["message"]
    assert view.progress is not None and view.progress.failed == 1
    assert leftovers(stack, view.job.job_id) == []
    assert not output.exists()
    # The failure's log line carries this job's keys, not those of other invocations that ran
    # in the same process (other tile workers, earlier mergers).
    logged = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    failure = next(entry for entry in logged if "raised TileFailed" in entry["message"])
    assert failure["job_id"] == view.job.job_id and "action" not in failure


def test_worker_failing_once_is_retried_and_the_job_succeeds(
    stack: LocalStack, tmp_path: Path, small_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tilefan.stages.process.execute_tile
    failed: list[int] = []

    def flaky(chain: Any, spec: Any, block: Any, out: Any) -> Any:
        if out.x == 128 and out.y == 0 and not failed:
            failed.append(1)
            raise TransientError("injected: storage hiccup")
        return real(chain, spec, block, out)

    monkeypatch.setattr(tilefan.stages.process, "execute_tile", flaky)
    view, _ = run(stack, small_source, tmp_path, [{"op": "invert"}], tile_size=64, ext="png")
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert failed == [1]
    tiles = stack.service.jobs.tiles(view.job.job_id, view.job.grid["tile_count"])
    attempts = {t.index: t.attempts for t in tiles}
    assert attempts[2] == 2
    assert sum(attempts.values()) == view.job.grid["tile_count"] + 1


def test_duplicated_tile_delivery_counts_once(
    stack: LocalStack, tmp_path: Path, small_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tilefan.stages.pipeline.Pipeline.process_batch

    def twice(self: Any, job_id: str, tiles: Any) -> Any:
        real(self, job_id, tiles)
        return real(self, job_id, tiles)

    monkeypatch.setattr(tilefan.stages.pipeline.Pipeline, "process_batch", twice)
    view, _ = run(stack, small_source, tmp_path, [{"op": "invert"}], tile_size=64, ext="png")
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    records = stack.service.jobs.tiles(view.job.job_id, view.job.grid["tile_count"])
    assert len(records) == view.job.grid["tile_count"] == 4 * 5
    assert all(r.state is TileState.DONE and r.attempts == 1 for r in records)
    assert view.progress is not None and view.progress.done == 20


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("truncated.jpg", "DAMAGED_IMAGE"),
        ("README.md", "UNSUPPORTED_FORMAT"),
        ("17000x17000.avif", "TOO_MANY_PIXELS"),
    ],
)
def test_bad_input_fails_the_job_with_its_own_code(
    stack: LocalStack, tmp_path: Path, name: str, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = shared_image(name)
    decoded: list[str] = []
    real = tilefan.stages.split.transcode
    monkeypatch.setattr(
        tilefan.stages.split,
        "transcode",
        lambda image, *args: decoded.append(str(args[2])) or real(image, *args),
    )
    view, _ = run(stack, source, tmp_path, [{"op": "invert"}])
    assert view.job.status is JobStatus.FAILED
    assert view.job.error is not None and view.job.error["code"] == code, view.job.error
    assert leftovers(stack, view.job.job_id) == []
    if code != "DAMAGED_IMAGE":
        assert decoded == [], "the input was decoded before it was refused"


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("jpeg", {"quality": 85}),
        ("webp", {"lossless": True}),
        ("tiff", {"pyramid": True, "compression": "lzw"}),
    ],
)
def test_output_formats_hold_the_whole_image_result(
    stack: LocalStack, tmp_path: Path, small_source: Path, fmt: str, options: dict[str, Any]
) -> None:
    ops = [{"op": "gaussblur", "sigma": 1.5}]
    output = tmp_path / f"out.{fmt}"
    view = run_job(
        stack,
        small_source,
        output,
        ops,
        output_format=fmt,
        tile_size=64,
        output_options=options,
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    expected = whole(pyvips.Image.new_from_file(str(small_source)), ops)
    # The same pixels through the same libvips encoder decode to the same pixels.
    reference = tmp_path / f"reference.{fmt}"
    if fmt == "jpeg":
        expected.jpegsave(str(reference), Q=85)
    elif fmt == "webp":
        expected.webpsave(str(reference), lossless=True)
    else:
        expected.tiffsave(str(reference), tile=True, pyramid=True, compression="lzw")
    assert_identical(
        pyvips.Image.new_from_file(str(reference)), pyvips.Image.new_from_file(str(output))
    )
    if fmt == "tiff":
        assert pyvips.Image.new_from_file(str(output)).get("n-pages") > 1


def test_deepzoom_output_is_a_zip_with_a_dzi_and_every_level(
    stack: LocalStack, tmp_path: Path, small_source: Path
) -> None:
    import zipfile

    output = tmp_path / "out.zip"
    view = run_job(
        stack,
        small_source,
        output,
        [{"op": "invert"}],
        output_format="dz",
        tile_size=64,
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    names = zipfile.ZipFile(output).namelist()
    assert any(name.endswith(".dzi") for name in names)
    # 300 x 200 needs levels 0 to 9 (ceil(log2(300)) = 9).
    levels = {name.split("/")[-2] for name in names if name.endswith(".jpeg")}
    assert levels == {str(level) for level in range(10)}

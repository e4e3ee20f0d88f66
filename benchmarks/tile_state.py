"""Tile-state bookkeeping on the embedded engine: status reads and the per-tile overhead.

Two measurements, each run once (docs/benchmarks.md, "Tile state"):

- **status reads**: `JobService.view` (what ``GET /jobs/{id}`` does) on jobs of 4,096 and
  20,000 tiles whose records are created directly through `JobRepository`, idle and while a
  small job runs on the same engine; median and worst of the reads, and the DynamoDB requests
  one read makes.
- **per-tile overhead**: a real job at 64-pixel tiles and at the default tile size; per tile,
  the worker's time outside the tile's own work (fetch, chain, store), the part of it spent in
  tile-state calls, and the DynamoDB requests the workers made.

The script uses only calls that the tile-state change left alone, so the same file measures the
code before it (run it from an export of the earlier commit) and after.
Run: ``.venv/bin/python -m benchmarks.tile_state``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from botocore.client import BaseClient

import tilefan.stages.process
from tilefan.local.stack import LOCAL_OWNER, LocalStack, local_stack, run_job
from tilefan.stages.pipeline import Pipeline
from tilefan.state.jobs import JobRepository, JobStatus
from tilefan.state.storage import TileStore

STATUS_TILES = (4_096, 20_000)
READS = 5
"""Status reads timed per job and condition (``--reads N`` to change)."""
OVERHEAD_CASES = (
    ("64 px tiles", 768, 768, 64),  # 144 tiles
    ("default 1024 px tiles", 3072, 2048, 1024),  # 6 tiles
)
_WRITES = ("PutItem", "UpdateItem", "BatchWriteItem", "DeleteItem")
_STATE_CALLS = ("tile_started", "tile_finished", "tile_retrying", "tiles_started", "tiles_finished")


@contextmanager
def _dynamodb_requests() -> Iterator[Counter[str]]:
    """Every DynamoDB request made in this process (the engine runs the handlers in it)."""
    requests: Counter[str] = Counter()
    real = BaseClient._make_api_call

    def counted(client: Any, operation: str, params: Any) -> Any:
        if client.meta.service_model.service_name == "dynamodb":
            requests[operation] += 1
        return real(client, operation, params)

    BaseClient._make_api_call = counted  # type: ignore[method-assign]
    try:
        yield requests
    finally:
        BaseClient._make_api_call = real  # type: ignore[method-assign]


def _split_job(stack: LocalStack, tile_count: int) -> str:
    jobs = stack.service.jobs
    job = jobs.new_job(owner=LOCAL_OWNER, operations=[], output_format="png", tile_size=64)
    jobs.create_tiles(job.job_id, tile_count)
    jobs.transition(
        job.job_id,
        JobStatus.CREATED,
        allowed_from={JobStatus.CREATED},
        grid={"tile_count": tile_count, "columns": 128, "rows": -(-tile_count // 128)},
    )
    return job.job_id


def _reads(stack: LocalStack, job_id: str, reads: int) -> dict[str, float]:
    """Wall seconds per read, and the reading thread's CPU seconds (moto answers in it): on a
    loaded machine the wall time is the CPU time stretched by the wait for a core."""
    seconds, cpu_seconds = [], []
    for _ in range(reads):
        started, cpu_started = time.perf_counter(), time.thread_time()
        stack.service.view(LOCAL_OWNER, job_id)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.thread_time() - cpu_started)
    return {
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "median_cpu_s": statistics.median(cpu_seconds),
    }


def _image(folder: Path, width: int, height: int) -> Path:
    from tests.support import noise_image

    path = folder / f"noise-{width}x{height}.tif"
    noise_image(width, height, 3, seed=5).tiffsave(str(path))
    return path


def status_reads(reads: int = READS) -> dict[str, Any]:
    """Status read latency idle and while a 256-tile job runs, and its DynamoDB requests."""
    result: dict[str, Any] = {}
    with local_stack() as stack, tempfile.TemporaryDirectory() as scratch:
        jobs = {tiles: _split_job(stack, tiles) for tiles in STATUS_TILES}
        for tiles, job_id in jobs.items():
            with _dynamodb_requests() as requests:
                stack.service.view(LOCAL_OWNER, job_id)
            result[f"{tiles} tiles"] = {
                "idle": _reads(stack, job_id, reads),
                "requests": dict(requests),
            }
        source = _image(Path(scratch), 1024, 1024)
        done = threading.Event()

        def background() -> None:
            run_job(stack, source, Path(scratch) / "out.png", [{"op": "invert"}],
                    output_format="png", tile_size=64, concurrency=2)  # fmt: skip
            done.set()

        worker = threading.Thread(target=background)
        worker.start()
        time.sleep(3)  # past the split, into the map
        for tiles, job_id in jobs.items():
            result[f"{tiles} tiles"]["while a job runs"] = _reads(stack, job_id, reads)
        result["job still running when the reads ended"] = not done.is_set()
        worker.join()
    return result


_IN_BATCH = threading.local()
"""Set while a thread runs a worker's batch: the splitter and merger store and fetch tiles too."""


def _timed(seconds: Counter[str], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, adding its time to ``seconds[name]`` when a worker's batch calls it."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outermost = name == "batch"
        if not (outermost or getattr(_IN_BATCH, "on", False)):
            return method(*args, **kwargs)
        _IN_BATCH.on = True
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - started
            _IN_BATCH.on = not outermost

    return wrapper


@contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


def per_tile_overhead() -> dict[str, Any]:
    """Per tile: the worker's time outside fetch, chain and store, and its bookkeeping."""
    result: dict[str, Any] = {}
    for label, width, height, tile_size in OVERHEAD_CASES:
        seconds: Counter[str] = Counter()
        patches = [
            (Pipeline, "process_batch", _timed(seconds, "batch", Pipeline.process_batch)),
            (TileStore, "get_tile", _timed(seconds, "work", TileStore.get_tile)),
            (TileStore, "put_tile", _timed(seconds, "work", TileStore.put_tile)),
            (
                tilefan.stages.process,
                "execute_tile",
                _timed(seconds, "work", tilefan.stages.process.execute_tile),
            ),
        ] + [
            (JobRepository, name, _timed(seconds, "state", getattr(JobRepository, name)))
            for name in _STATE_CALLS
            if hasattr(JobRepository, name)
        ]
        with local_stack() as stack, tempfile.TemporaryDirectory() as scratch:
            source = _image(Path(scratch), width, height)
            with _dynamodb_requests() as requests, _all(patches):
                started = time.perf_counter()
                view = run_job(stack, source, Path(scratch) / "out.png", [{"op": "invert"}],
                               output_format="png", tile_size=tile_size, concurrency=2,
                               poll_seconds=0.1)  # fmt: skip
                wall = time.perf_counter() - started
                writes = {k: v for k, v in requests.items() if k in _WRITES}
        if view.job.status is not JobStatus.SUCCEEDED:
            raise RuntimeError(f"{label}: job ended {view.job.status.value}: {view.job.error}")
        tiles = int((view.job.grid or {})["tile_count"])
        result[label] = {
            "tiles": tiles,
            "job_wall_ms_per_tile": 1000 * wall / tiles,
            "map_wall_ms_per_tile": 1000 * view.job.timings.get("process", 0.0) / tiles,
            "worker_overhead_ms_per_tile": 1000 * (seconds["batch"] - seconds["work"]) / tiles,
            "tile_state_ms_per_tile": 1000 * seconds["state"] / tiles,
            "tile_work_ms_per_tile": 1000 * seconds["work"] / tiles,
            "dynamodb_writes_per_tile": sum(writes.values()) / tiles,
            "dynamodb_writes": writes,
        }
    return result


@contextmanager
def _all(patches: list[tuple[Any, str, Any]]) -> Iterator[None]:
    if not patches:
        yield
        return
    (owner, name, value), rest = patches[0], patches[1:]
    with _patched(owner, name, value), _all(rest):
        yield


def main() -> None:
    """Print both measurements as JSON (``status`` or ``overhead`` to run one)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tile_state")
    parser.add_argument("which", nargs="*", choices=["status", "overhead"])
    parser.add_argument("--reads", type=int, default=READS)
    arguments = parser.parse_args()
    which = set(arguments.which) or {"status", "overhead"}
    out: dict[str, Any] = {}
    if "status" in which:
        out["status reads"] = status_reads(arguments.reads)
    if "overhead" in which:
        out["per-tile overhead"] = per_tile_overhead()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

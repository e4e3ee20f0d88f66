"""One tilefan job on the embedded engine, instrumented: stage times, tiles, bytes, requests.

Run in a child process per case (``python -m benchmarks.embedded``), because the handlers read
their settings (``TILEFAN_TILE_ENCODING``, ``TILEFAN_TILES_PER_ITEM``) from the environment when
the engine loads them, and so that each case starts from an empty moto.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks._child import run_child, write_result

if TYPE_CHECKING:
    from tilefan.service.job_service import JobService
    from tilefan.state.jobs import Job

__all__ = ["CHECKSUM_ENV", "case_main", "create_job", "run_case", "run_embedded"]

CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}
"""In the embedded engine, botocore hands moto a whole aws-chunked body at once, and both sides
join it chunk by chunk: a 60 MB PUT costs 5.2 s instead of 0.9 s, quadratic in the size. On AWS
the same checksum streams. The harness turns the optional checksums off by default so that it
measures tilefan rather than that artefact (``--s3-checksums`` keeps them)."""


def run_embedded(
    case: Mapping[str, Any],
    source: Path,
    *,
    s3_checksums: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``case`` (chain, tile_size, concurrency, encoding, tiles_per_item) in a child."""
    return run_case(
        "benchmarks.embedded",
        case,
        source,
        env={} if s3_checksums else CHECKSUM_ENV,
        timeout=timeout,
    )


def run_case(
    module: str,
    case: Mapping[str, Any],
    source: Path,
    *,
    env: Mapping[str, str],
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``case`` on ``source`` in ``python -m module``, a child whose entry is ``case_main``.

    The child's environment holds the handlers' settings that ``case`` names, then ``env``.
    """
    settings = {
        "TILEFAN_TILE_ENCODING": str(case["encoding"]),
        "TILEFAN_TILES_PER_ITEM": str(case["tiles_per_item"]),
    }
    return run_child(
        module,
        ["--case", json.dumps(dict(case)), "--source", str(source)],
        env={**settings, **env},
        timeout=timeout,
    )


# --- inside the child -------------------------------------------------------------------------


def case_main(
    run: Callable[[dict[str, Any], Path], Mapping[str, Any]], description: str | None
) -> None:
    """What a ``run_case`` child runs: ``run(case, source)``, its result written where asked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--case", required=True)
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    write_result(args.result, run(json.loads(args.case), args.source))


def create_job(service: JobService, case: Mapping[str, Any], source: Path) -> Job:
    """The local owner's TIFF job for ``case``'s chain, tile size and output options (none by
    default; never a preview), declaring ``source``."""
    from benchmarks.chains import CHAINS
    from tilefan.local.stack import LOCAL_OWNER

    return service.create(
        LOCAL_OWNER,
        CHAINS[case["chain"]],
        "tiff",
        tile_size=int(case["tile_size"]),
        # A run's job, as `tilefan run` makes it: no job page, so no preview.
        output_options={"preview": False, **case.get("output_options", {})},
        input_info={"size_bytes": source.stat().st_size},
    )


class _StorageMeter:
    """Counts bytes, requests and seconds of every TileStore call, by stage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def record(self, category: str, size: int, seconds: float) -> None:
        with self.lock:
            self.bytes[category] += size
            self.requests[category] += 1
            self.seconds[category] += seconds


def _category(operation: str, key: str) -> str:
    if key.startswith("uploads/"):
        if operation == "range":  # the splitter's header and a tiled upload's tiles, by range
            return "range_read_upload"
        return "client_upload" if operation == "upload" else "split_read_source"
    if key.startswith("results/"):
        return "merge_write_result" if operation == "upload" else "client_download"
    if key.endswith("manifest.json"):
        return "split_write_manifest" if operation == "put" else "manifest_read"
    if key.endswith("/source.tif"):
        return "split_write_transcode" if operation == "put" else "map_read_source"
    if "/out/" in key or "/encoded/" in key:
        return "map_write_tiles" if operation == "put" else "merge_read_tiles"
    if "/reduced/" in key:  # the coarse levels' groups, which the merger writes and reads
        return "merge_write_coarse" if operation == "put" else "merge_read_coarse"
    return f"other_{operation}"


def _instrument(
    meter: _StorageMeter, calls: Counter[str], batches: list[tuple[float, float, int]]
) -> None:
    from tilefan.stages.pipeline import Pipeline
    from tilefan.state.jobs import JobRepository
    from tilefan.state.ranged import MultipartObject, RangedObject
    from tilefan.state.storage import TileStore

    original_batch = Pipeline.process_batch

    def process_batch(pipeline: Pipeline, job_id: str, tiles: Any) -> dict[str, Any]:
        started = time.monotonic()
        try:
            return original_batch(pipeline, job_id, tiles)
        finally:
            batches.append((started, time.monotonic(), len(tiles)))

    setattr(Pipeline, "process_batch", process_batch)  # noqa: B010 - a measurement hook

    original_put, original_get = TileStore._put, TileStore._get
    original_upload, original_download = TileStore.upload, TileStore.download

    def _put(store: TileStore, key: str, body: bytes, *args: Any) -> None:
        started = time.monotonic()
        original_put(store, key, body, *args)
        meter.record(_category("put", key), len(body), time.monotonic() - started)

    def _get(store: TileStore, key: str, byte_range: str | None = None) -> bytes:
        started = time.monotonic()
        body = original_get(store, key, byte_range)
        meter.record(_category("get", key), len(body), time.monotonic() - started)
        return body

    def upload(store: TileStore, path: Path, key: str, content_type: str) -> None:
        started = time.monotonic()
        original_upload(store, path, key, content_type)
        meter.record(_category("upload", key), path.stat().st_size, time.monotonic() - started)

    def download(store: TileStore, key: str, path: Path) -> None:
        started = time.monotonic()
        original_download(store, key, path)
        meter.record(_category("download", key), path.stat().st_size, time.monotonic() - started)

    # Measurement hooks around the storage calls every stage makes, in this process only.
    for name, hook in (("_put", _put), ("_get", _get), ("upload", upload), ("download", download)):
        setattr(TileStore, name, hook)

    original_fetch, original_part = RangedObject._fetch, MultipartObject._upload_part

    def fetch(remote: RangedObject, start: int, end: int) -> bytes:
        started = time.monotonic()
        body = original_fetch(remote, start, end)
        operation = "range" if remote.key.startswith("uploads/") else "get"
        meter.record(_category(operation, remote.key), len(body), time.monotonic() - started)
        return body

    def upload_part(upload: MultipartObject, number: int, body: bytes) -> Any:
        started = time.monotonic()
        part = original_part(upload, number, body)
        meter.record(_category("put", upload.key), len(body), time.monotonic() - started)
        return part

    setattr(RangedObject, "_fetch", fetch)  # noqa: B010 - a measurement hook
    setattr(MultipartObject, "_upload_part", upload_part)  # noqa: B010 - a measurement hook

    def counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return method(*args, **kwargs)

        return wrapper

    for name in (
        "get",
        "transition",
        "create_tiles",
        "tiles_started",
        "tiles_finished",
        "progress",
    ):
        setattr(JobRepository, name, counted(name, getattr(JobRepository, name)))


def _dispatch_gaps(batches: list[tuple[float, float, int]], lanes: int) -> list[float]:
    """Seconds from a lane coming free to its next item starting, for every item after the
    first ``lanes`` (which start together): what the interpreter and the invocation cost."""
    starts = sorted(start for start, _, _ in batches)
    ends = sorted(end for _, end, _ in batches)
    return [max(0.0, start - ends[number]) for number, start in enumerate(starts[lanes:])]


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {
        "min": float(ordered[0]),
        "p50": float(statistics.median(ordered)),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": float(ordered[-1]),
        "mean": round(statistics.fmean(ordered), 1),
    }


def _run(case: Mapping[str, Any], source: Path) -> dict[str, Any]:
    import tempfile

    from benchmarks.memwatch import watch
    from tilefan.local.stack import LOCAL_OWNER, local_stack
    from tilefan.state.jobs import TERMINAL, JobStatus
    from tilefan.state.storage import keys

    meter, calls = _StorageMeter(), Counter[str]()
    batches: list[tuple[float, float, int]] = []
    _instrument(meter, calls, batches)
    result: dict[str, Any] = {}
    with local_stack() as stack, tempfile.TemporaryDirectory(prefix="tilefan-run-") as scratch:
        service = stack.service
        job = create_job(service, case, source)
        cpu_before = os.times()
        with watch(result):
            started = time.monotonic()
            service.store.upload(source, keys.upload(job.job_id), "application/octet-stream")
            uploaded = time.monotonic()
            service.start(LOCAL_OWNER, job.job_id, max_concurrency=int(case["concurrency"]))
            deadline = uploaded + float(case.get("timeout", 6 * 3600))
            while True:
                current = service.jobs.get(job.job_id)
                if current.status in TERMINAL or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            finished = time.monotonic()
            output = Path(scratch) / "result.tif"
            if current.status is JobStatus.SUCCEEDED and current.output:
                service.store.download(current.output["key"], output)
            downloaded = time.monotonic()
        cpu_after = os.times()
        tiles = service.jobs.tiles(job.job_id, int((current.grid or {}).get("tile_count", 0)))
    if current.status is not JobStatus.SUCCEEDED:
        raise RuntimeError(f"job ended {current.status.value}: {current.error}")
    durations = [tile.duration_ms for tile in tiles if tile.duration_ms is not None]
    grid = current.grid or {}
    source_info = current.source or {}
    tile_count = int(grid.get("tile_count", len(tiles)))
    tiles_per_item = int(case["tiles_per_item"])
    items = -(-tile_count // tiles_per_item)
    timings = dict(current.timings)
    lanes = min(int(case["concurrency"]), items)
    map_s = timings.get("process", 0.0)
    in_tiles_ms = float(sum(durations))
    in_handlers_ms = 1000 * sum(end - start for start, end, _ in batches)
    gaps_ms = [1000 * gap for gap in _dispatch_gaps(batches, lanes)]
    # Items after the first wave each waited one gap; the first wave's start is the map's
    # own start-up, counted once.
    dispatch_ms_per_item = statistics.fmean(gaps_ms) if gaps_ms else 0.0
    result.update(
        status=current.status.value,
        source_pixels=int(source_info.get("width", 0)) * int(source_info.get("height", 0)),
        output_pixels=int(grid.get("output_width", 0)) * int(grid.get("output_height", 0)),
        output_bytes=int((current.output or {}).get("size_bytes", 0)),
        tile_count=tile_count,
        items=items,
        timings=timings,
        upload_s=uploaded - started,
        execution_s=finished - uploaded,
        download_s=downloaded - finished,
        end_to_end_s=downloaded - started,
        cpu_s=(cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
        tile_ms=_percentiles(durations),
        tile_ms_all=durations,
        lanes=lanes,
        # Per tile, the time a lane spends on a tile's behalf outside the tile's own work
        # (fetch, compute, store): the interpreter dispatching its item and invoking the
        # worker, plus the worker's job reads and tile bookkeeping.
        dispatch_ms_per_item=dispatch_ms_per_item,
        handler_overhead_ms_per_tile=(in_handlers_ms - in_tiles_ms) / max(tile_count, 1),
        orchestration_ms_per_tile=(dispatch_ms_per_item * items + in_handlers_ms - in_tiles_ms)
        / max(tile_count, 1),
        # Lane time in the map stage outside tiles, per tile: the above plus lanes idle at the
        # start and in the tail, when fewer items remain than lanes.
        lane_time_outside_tiles_ms_per_tile=(map_s * 1000 * lanes - in_tiles_ms)
        / max(tile_count, 1),
        batches=[
            [round(start - uploaded, 3), round(end - uploaded, 3), n] for start, end, n in batches
        ],
        storage={
            "bytes": dict(meter.bytes),
            "requests": dict(meter.requests),
            "seconds": {name: round(value, 3) for name, value in meter.seconds.items()},
        },
        repository_calls=dict(calls),
    )
    return result


def main() -> None:
    logging.getLogger().setLevel(logging.WARNING)
    case_main(_run, __doc__)


if __name__ == "__main__":
    main()

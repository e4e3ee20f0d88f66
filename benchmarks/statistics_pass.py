"""What a statistics pass costs: ``hist_equal`` tiled (pass + processing) against libvips.

Run once (``python -m benchmarks.statistics_pass --megapixels 500``); it writes
``benchmarks/results/statistics-pass/results.json``. The source is a synthetic RGB tiled TIFF,
written as the splitter writes its transcode (256-px tiles, deflate level 1), the form the
workers read by range. In one process, paired in one run:

- whole-image libvips ``hist_equal`` from that file (its `hist_find` and `maplut` each decode
  it), and on the image decoded into memory beforehand;
- the tiled path as the workers run it: each tile's source block read by range through the
  project's own reader (`source_block`, `RangedObject`) from the file, then the statistics
  pass (every tile's partial, combined), then the processing pass with the bound step, and the
  same processing pass for ``invert``, a point step with no pass, as the baseline of what
  tiling costs without one;
- the bytes and requests the pass's reads fetch, the directory each worker's first open reads,
  the partials and the combined result;
- the model's figure for the pass at 10 GP on Lambda, from those measurements (`predict_pass`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyvips

from benchmarks import model
from benchmarks.images import synthetic_tiled_tiff
from tilefan.formats.tiled import open_object, source_block
from tilefan.imaging.execute import (
    assemble,
    execute_tile,
    pass_plan,
    statistics_passes,
    tile_statistics,
)
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import ImageSpec, Tile, TilePlan, plan_tiles
from tilefan.imaging.statistics import Statistics
from tilefan.stages.statistics import REDUCE_THREADS
from tilefan.state.ranged import REQUESTS_IN_FLIGHT
from tilefan.state.storage import TileStore

__all__ = ["FileObjects", "measure", "predict_pass"]

RESULTS = Path(__file__).resolve().parent / "results" / "statistics-pass"


class FileObjects:
    """The two S3 calls `RangedObject` makes, answered from one local file, counted.

    ``latency_s`` is slept before each GET answers (a stand-in for S3's first-byte latency;
    concurrent GETs wait it at once, as they would on S3).
    """

    def __init__(self, path: Path, latency_s: float = 0.0) -> None:
        self.path = path
        self.latency_s = latency_s
        self.requests = 0
        self.bytes_fetched = 0
        self._lock = threading.Lock()

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 (boto3's names)
        return {"ContentLength": self.path.stat().st_size}

    def get_object(self, *, Bucket: str, Key: str, Range: str) -> dict[str, Any]:  # noqa: N803
        start, end = (int(n) for n in Range.removeprefix("bytes=").split("-"))
        time.sleep(self.latency_s)
        with self.path.open("rb") as file:
            file.seek(start)
            body = file.read(end + 1 - start)
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(body)
        return {"Body": io.BytesIO(body)}

    def counted(self) -> tuple[int, int]:
        """Requests and bytes since the last call."""
        counts = (self.requests, self.bytes_fetched)
        self.requests = self.bytes_fetched = 0
        return counts


def _tiled_s(
    store: TileStore, plan: TilePlan, each: Callable[[pyvips.Image, Tile], Any]
) -> tuple[float, float, list[Any]]:
    """Wall and CPU seconds of ``each`` over every tile's block, read by range; its answers."""
    started, cpu = time.monotonic(), time.process_time()
    answers = [
        each(source_block(store, "source", 0, tile.source, plan.spec.interpretation), tile)
        for tile in plan.tiles()
    ]
    return time.monotonic() - started, time.process_time() - cpu, answers


def _processing_s(store: TileStore, spec: ImageSpec, chain: Chain, tile_size: int) -> float:
    plan = plan_tiles(spec, chain, tile_size)
    started = time.monotonic()
    _, _, tiles = _tiled_s(
        store, plan, lambda block, tile: execute_tile(chain, spec, block, tile.output)
    )
    assemble(plan, tiles).copy_memory()
    return time.monotonic() - started


def measure(source: Path, tile_size: int) -> dict[str, Any]:
    """The paired timings and the pass's bytes on the RGB tiled TIFF at ``source``."""
    chain = parse_chain([{"op": "hist_equal"}])
    objects = FileObjects(source)
    store = TileStore("benchmark", client=objects)  # type: ignore[arg-type]
    header, _ = open_object(store, "source", name="source", access="random")
    spec = ImageSpec.of(header)
    pixels = spec.width * spec.height
    directory_requests, directory_bytes = objects.counted()

    started = time.monotonic()
    pyvips.Image.new_from_file(str(source), access="sequential").hist_equal().copy_memory()
    whole_s = time.monotonic() - started
    decoded = pyvips.Image.new_from_file(str(source)).copy_memory()
    started = time.monotonic()
    decoded.hist_equal().copy_memory()
    whole_in_memory_s = time.monotonic() - started
    del decoded

    (step,) = statistics_passes(chain, spec)
    plan = pass_plan(chain, spec, tile_size, {}, step.upto)
    objects.counted()
    pass_s, pass_cpu_s, parts = _tiled_s(
        store, plan, lambda block, tile: tile_statistics(plan, block, tile, histogram=True)
    )
    pass_requests, pass_bytes = objects.counted()
    found = {step.upto: Statistics.combine(parts)}
    process_s = _processing_s(store, spec, chain.bind(found), tile_size)
    baseline_s = _processing_s(store, spec, parse_chain([{"op": "invert"}]), tile_size)

    per_item = model.TILES_PER_ITEM
    partial_bytes = [
        len(Statistics.combine(parts[start : start + per_item]).to_bytes())
        for start in range(0, len(parts), per_item)
    ]
    return {
        "megapixels": pixels / 1e6,
        "tile_size": tile_size,
        "tiles": plan.tile_count,
        "source_bytes": source.stat().st_size,
        "whole_libvips_s": whole_s,
        "whole_libvips_in_memory_s": whole_in_memory_s,
        "pass_s": pass_s,
        "pass_cpu_s_per_mp": pass_cpu_s / (pixels / 1e6),
        "process_s": process_s,
        "baseline_point_process_s": baseline_s,
        "tiled_over_whole": (pass_s + process_s) / whole_s,
        "pass_over_whole": pass_s / whole_s,
        "pass_over_processing": pass_s / process_s,
        "directory_requests_per_open": directory_requests,
        "directory_bytes_per_open": directory_bytes,
        "pass_read_requests": pass_requests,
        "pass_read_bytes": pass_bytes,
        "pass_read_bytes_per_px": pass_bytes / pixels,
        "pass_read_requests_per_tile": pass_requests / plan.tile_count,
        "partial_bytes_per_item": sum(partial_bytes) / len(partial_bytes),
        "combined_bytes": len(found[step.upto].to_bytes()),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }


def predict_pass(
    measured: dict[str, Any], gigapixels: float, tile_size: int, concurrency: int
) -> dict[str, Any]:
    """The model's extra wall time and cost of one statistics pass on Lambda.

    What the code does: the splitter only writes the pass's manifest (nothing is cut for it);
    each item of the pass's Distributed Map reads the job, reads its tiles' blocks of the source
    by ranged GETs (one directory read per warm environment, which `source_block` then keeps for
    the processing pass too), computes each tile's partial, stores one partial and marks its
    tiles done in its band item; the reduce (the merger) reads every partial with
    `REDUCE_THREADS` threads, stores the combined result and moves the job on. Every time and
    price comes from `model.ASSUMPTIONS` (each with its source) or from ``measured``.
    """
    pixels = gigapixels * 1e9
    tiles = math.ceil(math.sqrt(pixels) / tile_size) ** 2
    items = math.ceil(tiles / model.TILES_PER_ITEM)
    lanes = max(1, min(concurrency, items))
    net = model._a("network_mb_per_s") * 1e6
    s3 = model._a("s3_request_latency_s")
    ddb = model._a("dynamodb_request_latency_s")
    tile_px = tile_size * tile_size
    worker_vcpu = model.WORKER_MB / model._a("mb_per_vcpu")
    # The measured requests and bytes include one open's directory; per tile, without it.
    read_requests = (
        measured["pass_read_requests"] - measured["directory_requests_per_open"]
    ) / measured["tiles"]
    read_bytes = (
        (measured["pass_read_bytes"] - measured["directory_bytes_per_open"])
        / measured["megapixels"]
        / 1e6
        * tile_px
    )
    # HeadObject, then the directory's ranged GETs, once per environment.
    open_requests = 1 + measured["directory_requests_per_open"]
    open_s = open_requests * s3 + measured["directory_bytes_per_open"] / net
    # A block's ranged GETs go out together, `REQUESTS_IN_FLIGHT` at a time (the prefetch).
    tile_s = (
        math.ceil(read_requests / REQUESTS_IN_FLIGHT) * s3
        + read_bytes / net
        + measured["pass_cpu_s_per_mp"] * tile_px / 1e6 / min(worker_vcpu, 2.0)
    )
    # Dispatch, the job read, the tiles, the partial's PUT, the band write marking them done.
    item_s = model._a("item_dispatch_s") + ddb + model.TILES_PER_ITEM * tile_s + s3 + ddb
    ramp = max(0, math.ceil(lanes / model._a("scaling_envs_per_10s")) - 1) * 10.0
    map_s = ramp + open_s + math.ceil(items / lanes) * item_s
    # The merger: the job read, the manifest, the partials, the combined result's PUT, the
    # transition; it starts cold (the pass is its first call in a job).
    partials_s = (
        math.ceil(items / REDUCE_THREADS) * s3 + items * measured["partial_bytes_per_item"] / net
    )
    reduce_s = model._a("runtime_init_s") + ddb + s3 + partials_s + s3 + ddb
    units = model.tile_state_units(tiles)
    gb_s = (
        model.WORKER_MB / 1024 * (items * item_s + lanes * open_s)
        + model.MERGER_MB / 1024 * reduce_s
    )
    cost = {
        "lambda_duration": gb_s * model._a("price_gb_s_arm64"),
        "lambda_requests": (items + 1) * model._a("price_per_request_lambda"),
        "step_functions": (4 + 2 * items) * model._a("price_per_transition"),
        # PUT: the manifest, the partials, the combined result. GET: the tiles' ranges, each
        # environment's open, the map reading the manifest, the reduce reading it and the
        # partials.
        "s3_requests": (items + 2) * model._a("price_s3_put")
        + (tiles * read_requests + lanes * open_requests + 2 + items) * model._a("price_s3_get"),
        # A job read per item, one band write per item (the stripes keep a batch in one band).
        "dynamodb": items * math.ceil(units["band_bytes"] / 1024) * model._a("price_ddb_write")
        + items * model._a("price_ddb_read"),
    }
    return {
        "gigapixels": gigapixels,
        "tile_size": tile_size,
        "concurrency": concurrency,
        "tiles": tiles,
        "items": items,
        "read_requests_per_tile": read_requests,
        "read_bytes_per_tile": read_bytes,
        "tile_s": tile_s,
        "item_s": item_s,
        "open_s": open_s,
        "map_s": map_s,
        "reduce_s": reduce_s,
        "extra_wall_s": map_s + reduce_s,
        "extra_cost_usd": sum(cost.values()),
        "cost_parts": cost,
    }


def main() -> None:
    """Measure once, model 10 GP, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=16)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tilefan-bench"))
    parser.add_argument(
        "--keep", action="store_true", help="keep the synthetic source (deleted by default)"
    )
    args = parser.parse_args()
    source, made_s = synthetic_tiled_tiff(args.megapixels, args.workdir)
    try:
        measured = measure(source, args.tile_size)
    finally:
        if not args.keep:
            source.unlink()
    result = {
        "measured": {**measured, "source_made_s": made_s},
        "model_10gp": predict_pass(measured, 10, args.tile_size, args.concurrency),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

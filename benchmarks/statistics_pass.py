"""What a statistics pass costs: ``hist_equal`` tiled (pass + processing) against libvips.

Run once at a modest size (``python -m benchmarks.statistics_pass --megapixels 16``); it writes
``benchmarks/results/statistics-pass/results.json``. In one process, paired in one run:

- whole-image libvips ``hist_equal`` on the decoded image in memory;
- the tiled path: the statistics pass (every tile's partial, combined), then the processing
  pass with the bound step, and the same processing pass for ``invert``, a point step with no
  pass, as the baseline of what tiling costs without one;
- the bytes the pass adds in the pipeline: its source tiles, the partials, the combined result;
- the model's figure for the pass at 10 GP on Lambda, from those measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import pyvips

from benchmarks import model
from benchmarks.images import synthetic_source
from tilefan.imaging.execute import assemble, execute_tile, gather_statistics, tile_statistics
from tilefan.imaging.operations import Chain, parse_chain
from tilefan.imaging.plan import ImageSpec, plan_tiles
from tilefan.imaging.statistics import Statistics

__all__ = ["measure", "predict_pass"]

RESULTS = Path(__file__).resolve().parent / "results" / "statistics-pass"


def _processing_s(image: pyvips.Image, chain: Chain, tile_size: int) -> float:
    spec = ImageSpec.of(image)
    plan = plan_tiles(spec, chain, tile_size)
    started = time.monotonic()
    tiles = [execute_tile(chain, spec, image.crop(*t.source), t.output) for t in plan.tiles()]
    assemble(plan, tiles).copy_memory()
    return time.monotonic() - started


def measure(megapixels: float, tile_size: int, workdir: Path) -> dict[str, Any]:
    """The paired timings and the pass's bytes on a synthetic RGB image of ``megapixels``."""
    source, _ = synthetic_source(megapixels, workdir)
    image = pyvips.Image.new_from_file(str(source)).copy_memory()
    chain = parse_chain([{"op": "hist_equal"}])
    spec = ImageSpec.of(image)

    started = time.monotonic()
    image.hist_equal().copy_memory()
    whole_s = time.monotonic() - started

    started, cpu = time.monotonic(), time.process_time()
    found = gather_statistics(image, chain, tile_size)
    pass_s, pass_cpu_s = time.monotonic() - started, time.process_time() - cpu
    process_s = _processing_s(image, chain.bind(found), tile_size)
    baseline_s = _processing_s(image, parse_chain([{"op": "invert"}]), tile_size)

    plan = plan_tiles(spec, Chain(), tile_size)
    tiles = list(plan.tiles())
    source_bytes = sum(
        len(image.crop(*t.source).tiffsave_buffer(compression="none", predictor="none"))
        for t in tiles
    )
    per_item = model.TILES_PER_ITEM
    partial_bytes = [
        len(
            Statistics.combine(
                [
                    tile_statistics(plan, image.crop(*t.source), t, histogram=True)
                    for t in tiles[start : start + per_item]
                ]
            ).to_bytes()
        )
        for start in range(0, len(tiles), per_item)
    ]
    return {
        "megapixels": image.width * image.height / 1e6,
        "tile_size": tile_size,
        "tiles": len(tiles),
        "whole_libvips_s": whole_s,
        "pass_s": pass_s,
        "pass_cpu_s_per_mp": pass_cpu_s / (image.width * image.height / 1e6),
        "process_s": process_s,
        "baseline_point_process_s": baseline_s,
        "tiled_over_whole": (pass_s + process_s) / whole_s,
        "pass_over_processing": pass_s / process_s,
        "pass_source_bytes": source_bytes,
        "pass_source_bytes_per_px": source_bytes / (image.width * image.height),
        "partial_bytes_per_item": sum(partial_bytes) / len(partial_bytes),
        "combined_bytes": len(found[0].to_bytes()),
    }


def predict_pass(
    measured: dict[str, Any], gigapixels: float, tile_size: int, concurrency: int
) -> dict[str, Any]:
    """The model's extra wall time and cost of one statistics pass on Lambda.

    The pass adds: the splitter cutting and storing its source tiles again (the processing
    tiles when the step is last), a Distributed Map whose items fetch those tiles, compute
    the partials and store one small object, and a reduce reading one object per item.
    """
    pixels = gigapixels * 1e9
    tiles = math.ceil(math.sqrt(pixels) / tile_size) ** 2
    items = math.ceil(tiles / model.TILES_PER_ITEM)
    net = model._a("network_mb_per_s") * 1e6
    s3 = model._a("s3_request_latency_s")
    tile_px = tile_size * tile_size
    bytes_in = measured["pass_source_bytes_per_px"] * tile_px
    worker_vcpu = model.WORKER_MB / model._a("mb_per_vcpu")
    cut_s = max(tiles * bytes_in / net, tiles * s3 / model.IO_THREADS)
    tile_s = (
        s3 + bytes_in / net + measured["pass_cpu_s_per_mp"] * tile_px / 1e6 / min(worker_vcpu, 2.0)
    )
    item_s = model._a("item_dispatch_s") + s3 + model.TILES_PER_ITEM * tile_s
    lanes = max(1, min(concurrency, items))
    map_s = math.ceil(items / lanes) * item_s
    reduce_s = items * s3 / model.IO_THREADS + model._a("runtime_init_s")
    gb_s = model.WORKER_MB / 1024 * items * item_s + model.MERGER_MB / 1024 * reduce_s
    cost = (
        gb_s * model._a("price_gb_s_arm64")
        + (items + 1) * model._a("price_per_request_lambda")
        + (4 + 2 * items) * model._a("price_per_transition")
        + (tiles + items + 1) * model._a("price_s3_put")
        + (tiles + items) * model._a("price_s3_get")
    )
    return {
        "gigapixels": gigapixels,
        "tile_size": tile_size,
        "concurrency": concurrency,
        "tiles": tiles,
        "items": items,
        "cut_s": cut_s,
        "map_s": map_s,
        "reduce_s": reduce_s,
        "extra_wall_s": cut_s + map_s + reduce_s,
        "extra_cost_usd": cost,
    }


def main() -> None:
    """Measure once, model 10 GP, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=16)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tilefan-bench"))
    args = parser.parse_args()
    measured = measure(args.megapixels, args.tile_size, args.workdir)
    result = {
        "measured": measured,
        "model_10gp": predict_pass(measured, 10, args.tile_size, args.concurrency),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

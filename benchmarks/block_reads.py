"""What a worker's block read costs, with and without the prefetch, at S3-like latency.

Run once (``python -m benchmarks.block_reads``); it writes
``benchmarks/results/block-reads/results.json``. The source is a synthetic RGB tiled TIFF
written as the splitter writes its transcode (256 px tiles, deflate level 1). Every tile's
source block (the tile and its halo, ``gaussblur`` sigma 2) is read in plan order through the
project's own reader (`source_block` over `RangedObject`), from a local file whose every GET
first sleeps ``--latency-ms`` (S3's "tens of milliseconds" of first-byte latency, concurrent
GETs waiting at once). Paired in one run: the same reads with `RangedObject.prefetch` turned
off, which is libtiff fetching one TIFF tile per GET, one after another, as before. The figures
are ratios of the two; the absolute times depend on this machine and the stand-in latency.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import tilefan.formats.tiled
from benchmarks.images import synthetic_tiled_tiff
from benchmarks.statistics_pass import FileObjects
from tilefan.formats.tiled import open_object, source_block
from tilefan.imaging.operations import parse_chain
from tilefan.imaging.plan import ImageSpec, plan_tiles
from tilefan.state.ranged import RangedObject
from tilefan.state.storage import TileStore

__all__ = ["measure"]

RESULTS = Path(__file__).resolve().parent / "results" / "block-reads"


def _read_blocks(source: Path, tile_size: int, latency_s: float) -> dict[str, Any]:
    objects = FileObjects(source, latency_s)
    store = TileStore("benchmark", client=objects)  # type: ignore[arg-type]
    header, _ = open_object(store, "source", name="source", access="random")
    spec = ImageSpec.of(header)
    plan = plan_tiles(spec, parse_chain([{"op": "gaussblur", "sigma": 2}]), tile_size)
    tilefan.formats.tiled._opened.cache_clear()
    tilefan.formats.tiled._opened(store, "source", 0)  # a warm worker: its directory read
    objects.counted()
    started = time.monotonic()
    for tile in plan.tiles():
        source_block(store, "source", 0, tile.source, spec.interpretation)
    elapsed = time.monotonic() - started
    requests, fetched = objects.counted()
    return {
        "tiles": plan.tile_count,
        "requests_per_block": requests / plan.tile_count,
        "bytes_per_block": fetched / plan.tile_count,
        "s_per_block": elapsed / plan.tile_count,
    }


def measure(source: Path, tile_size: int, latency_s: float) -> dict[str, Any]:
    """Block reads of ``source`` at ``tile_size``, prefetched and not, paired."""
    prefetched = _read_blocks(source, tile_size, latency_s)
    prefetch = RangedObject.prefetch
    setattr(RangedObject, "prefetch", lambda remote, ranges: None)  # noqa: B010 - the baseline
    try:
        serial = _read_blocks(source, tile_size, latency_s)
    finally:
        setattr(RangedObject, "prefetch", prefetch)  # noqa: B010
    return {
        "tile_size": tile_size,
        "latency_ms": latency_s * 1000,
        "prefetch": prefetched,
        "one_tiff_tile_per_get": serial,
        "requests_ratio": serial["requests_per_block"] / prefetched["requests_per_block"],
        "time_ratio": serial["s_per_block"] / prefetched["s_per_block"],
    }


def main() -> None:
    """Measure once per tile size, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=36)
    parser.add_argument("--tile-size", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--latency-ms", type=float, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tilefan-bench"))
    args = parser.parse_args()
    source, _ = synthetic_tiled_tiff(args.megapixels, args.workdir)
    try:
        rows = [measure(source, size, args.latency_ms / 1000) for size in args.tile_size]
    finally:
        source.unlink()
    result = {
        "megapixels": args.megapixels,
        "rows": rows,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

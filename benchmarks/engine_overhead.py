"""Orchestration cost of one Distributed Map item on the embedded engine.

A no-op tile worker over a 200-item manifest, at MaxConcurrency 2 and 8, paired against the
same run without the engine's speed-ups to moto's interpreter (a reused Lambda client and
cached JSONPath parses). Run: ``.venv/bin/python -m benchmarks.engine_overhead``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3

import tilefan.local.engine
from tilefan.local.engine import EmbeddedEngine

ITEMS = 200
CONCURRENCIES = (2, 8)
REPEATS = 3


def splitter(event: dict[str, Any], context: Any) -> dict[str, Any]:
    key = f"jobs/{event['job_id']}/manifest.json"
    body = json.dumps([{"batch": index} for index in range(ITEMS)]).encode()
    boto3.client("s3").put_object(Bucket=os.environ["TILEFAN_BUCKET"], Key=key, Body=body)
    return {"manifest_key": key, "tile_count": ITEMS, "batch_count": ITEMS}


def no_op(event: dict[str, Any], context: Any) -> None:
    return None


@contextmanager
def without_speedups() -> Iterator[None]:
    patches = tilefan.local.engine._MotoPatches  # a benchmark may reach inside
    original = patches._install_speedups
    patches._install_speedups = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        patches._install_speedups = original  # type: ignore[method-assign]


def measure(concurrency: int) -> tuple[float, float]:
    """Wall and CPU milliseconds per item for one execution."""
    handlers = {"SplitterFunction": splitter, "TileWorkerFunction": no_op, "MergerFunction": no_op}
    with EmbeddedEngine(handlers=handlers) as engine:
        wall, cpu = time.perf_counter(), time.process_time()
        result = engine.wait(engine.start_job("bench", max_concurrency=concurrency), timeout=600)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result["status"] != "SUCCEEDED":
        raise RuntimeError(f"benchmark execution ended {result['status']}")
    return 1000 * wall / ITEMS, 1000 * cpu / ITEMS


def main() -> None:
    """Print the median wall and CPU cost per item for each variant and concurrency."""
    print(f"{ITEMS} items, no-op worker, median of {REPEATS} runs, ms per item")
    print(f"{'variant':<16}{'MaxConcurrency':>16}{'wall':>8}{'cpu':>8}")
    for concurrency in CONCURRENCIES:
        for variant in ("engine", "moto as is"):
            runs: list[tuple[float, float]] = []
            for _ in range(REPEATS):
                if variant == "engine":
                    runs.append(measure(concurrency))
                else:
                    with without_speedups():
                        runs.append(measure(concurrency))
            wall = statistics.median(run[0] for run in runs)
            cpu = statistics.median(run[1] for run in runs)
            print(f"{variant:<16}{concurrency:>16}{wall:>8.1f}{cpu:>8.1f}")


if __name__ == "__main__":
    main()

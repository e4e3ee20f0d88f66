"""A Lambda-scale model: wall time and cost per gigapixel from measured costs and sourced numbers.

Nothing here is measured on AWS. The model takes what the harness measured on this machine (CPU
seconds per tile on one thread, bytes per tile, the serial stages' decode and encode rates, the
handler import time) and the published numbers in ``ASSUMPTIONS`` (each with its source), and
predicts each stage of a job on Lambda. Numbers marked ``assumed`` have no published source that
we found; their effect is stated next to them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ASSUMPTIONS",
    "Measured",
    "largest_within",
    "limits_table",
    "predict",
    "recommend",
    "sweep",
    "tile_state_units",
]

ASSUMPTIONS: dict[str, dict[str, Any]] = {
    "network_mb_per_s": {
        "value": 75.0,
        "note": "steady network throughput of one function (bursts higher)",
        "source": "shared/AWS-LIMITS.md (public iperf3 measurements)",
    },
    "s3_request_latency_s": {
        "value": 0.15,
        "note": "first-byte latency of one S3 request (small objects 100-200 ms)",
        "source": "https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html",
    },
    "dynamodb_request_latency_s": {
        "value": 0.010,
        "note": "one DynamoDB read or write ('single-digit millisecond'), rounded up",
        "source": "https://aws.amazon.com/dynamodb/ (product description)",
    },
    "item_dispatch_s": {
        "value": 0.05,
        "note": (
            "assumed: Step Functions starting a child execution and invoking the worker, per "
            "manifest item; no published figure found. Each +50 ms adds items/concurrency x "
            "50 ms to the map stage"
        ),
        "source": "assumed",
    },
    "runtime_init_s": {
        "value": 0.25,
        "note": "assumed: Lambda starting a Python environment, before the measured import",
        "source": "assumed",
    },
    "mb_per_vcpu": {
        "value": 1769,
        "note": "a function gets one vCPU-second of credit per second at 1,769 MB",
        "source": "https://docs.aws.amazon.com/lambda/latest/dg/configuration-memory.html",
    },
    "scaling_envs_per_10s": {
        "value": 1000,
        "note": "each function gains at most 1,000 execution environments every 10 seconds",
        "source": "https://docs.aws.amazon.com/lambda/latest/dg/scaling-behavior.html",
    },
    "account_concurrency": {
        "value": 1000,
        "note": "default concurrent executions per account (a quota increase allows more)",
        "source": "shared/AWS-LIMITS.md",
    },
    "timeout_s": {"value": 900, "note": "Lambda timeout", "source": "shared/AWS-LIMITS.md"},
    "tmp_mb": {"value": 10240, "note": "largest /tmp", "source": "shared/AWS-LIMITS.md"},
    "price_gb_s_arm64": {
        "value": 0.0000133334,
        "note": "Lambda duration, arm64 (the template's default), us-east-1",
        "source": "https://aws.amazon.com/lambda/pricing/",
    },
    "price_per_request_lambda": {
        "value": 0.20 / 1e6,
        "note": "Lambda, per request",
        "source": "https://aws.amazon.com/lambda/pricing/",
    },
    "price_per_transition": {
        "value": 0.025 / 1000,
        "note": (
            "Step Functions Standard, per state transition; a Distributed Map bills one "
            "transition per child execution, plus the child's own (we count 2 per item)"
        ),
        "source": "https://aws.amazon.com/step-functions/pricing/ ; "
        "https://docs.aws.amazon.com/step-functions/latest/dg/concepts-transitions.html",
    },
    "price_s3_put": {
        "value": 0.005 / 1000,
        "note": "S3 Standard PUT/COPY/POST/LIST, per request",
        "source": "https://aws.amazon.com/s3/pricing/",
    },
    "price_s3_get": {
        "value": 0.0004 / 1000,
        "note": "S3 Standard GET, per request",
        "source": "https://aws.amazon.com/s3/pricing/",
    },
    "price_ddb_write": {
        "value": 0.625 / 1e6,
        "note": "DynamoDB on-demand, per write request unit",
        "source": "https://aws.amazon.com/dynamodb/pricing/on-demand/",
    },
    "price_ddb_read": {
        "value": 0.125 / 1e6,
        "note": "DynamoDB on-demand, per read request unit",
        "source": "https://aws.amazon.com/dynamodb/pricing/on-demand/",
    },
}

SPLITTER_MB = 3008
WORKER_MB = 2048
MERGER_MB = 3008
TILES_PER_ITEM = 4
IO_THREADS = 16
PART_BYTES = 64 * 2**20
BANDS = 3


def _a(name: str) -> float:
    return float(ASSUMPTIONS[name]["value"])


@dataclass(frozen=True)
class Measured:
    """What the harness measured on this machine, per unit of work, for one chain."""

    tile_cpu_s_per_mp: Mapping[int, float]
    """CPU seconds per output megapixel of a tile worker, by tile size (one thread)."""
    tile_bytes_in_per_px: Mapping[int, float]
    tile_bytes_out_per_px: Mapping[int, float]
    split_decode_mp_per_cpu_s: float
    split_cut_cpu_s_per_mp: float
    merge_decode_cpu_s_per_mp: float
    merge_encode_mp_per_cpu_s: float
    output_bytes_per_px: float
    source_bytes_per_px: float
    init_s: float
    worker_peak_mb: Mapping[int, float]

    @classmethod
    def from_kernel(
        cls,
        kernel: Mapping[str, Any],
        *,
        encoding: str,
        source_bytes_per_px: float,
        init_s: float,
        worker_peak_mb: Mapping[int, float],
    ) -> Measured:
        """From ``benchmarks.kernel``'s result for one tile encoding."""
        rows = [row for row in kernel["tiles"] if row["encoding"] == encoding]
        by_size = {int(row["tile_size"]): row for row in rows}

        def per_mp(row: Mapping[str, Any], field: str) -> float:
            return float(row[field]) / (float(row["output_pixels"]) / 1e6)

        largest = by_size[max(by_size)]
        deflate = kernel["merge_encode"]["deflate"]
        return cls(
            tile_cpu_s_per_mp={size: per_mp(row, "cpu_s") for size, row in by_size.items()},
            tile_bytes_in_per_px={
                size: row["bytes_in"] / row["source_pixels"] for size, row in by_size.items()
            },
            tile_bytes_out_per_px={
                size: row["bytes_out"] / row["output_pixels"] for size, row in by_size.items()
            },
            split_decode_mp_per_cpu_s=float(kernel["split_decode"]["mp_per_cpu_s"]),
            split_cut_cpu_s_per_mp=float(largest["split_encode_cpu_s"])
            / (float(largest["source_pixels"]) / 1e6),
            merge_decode_cpu_s_per_mp=per_mp(largest, "merge_decode_cpu_s"),
            merge_encode_mp_per_cpu_s=float(deflate["mp_per_cpu_s"]),
            output_bytes_per_px=float(deflate["bytes_per_pixel"]),
            source_bytes_per_px=source_bytes_per_px,
            init_s=init_s,
            worker_peak_mb=dict(worker_peak_mb),
        )


def tile_state_units(tiles: int, tiles_per_item: int = TILES_PER_ITEM) -> dict[str, float]:
    """DynamoDB requests and capacity units of a job's tile state, per job and per status poll.

    The layout of `tilefan.state.jobs`: at most 100 band items, tiles dealt to them four at a
    time; per tile 2 bytes of state letter, about 3 of attempts and 4 of duration, plus about
    80 bytes of keys and TTL per band. A write costs a unit per started KB of the item, a
    strongly consistent read one per started 4 KB, an eventually consistent read half that.
    """
    from tilefan.state.jobs import BANDS, STRIPE_TILES

    bands = min(BANDS, math.ceil(tiles / STRIPE_TILES))
    band_bytes = 80 + 9 * math.ceil(tiles / bands)
    write_units = math.ceil(band_bytes / 1024)
    read_units = math.ceil(band_bytes / 4096)
    items = math.ceil(tiles / tiles_per_item)
    touched = math.ceil(tiles_per_item / STRIPE_TILES)  # bands one (aligned) batch writes
    return {
        "band_items": bands,
        "band_bytes": band_bytes,
        "split_write_units": bands * write_units,
        "worker_write_requests": 2 * items * touched,
        "worker_write_units": 2 * items * touched * write_units,
        "worker_job_reads": 2 * items,
        "merge_check_read_units": bands * read_units,
        "poll_requests": 2,
        "poll_read_units": 1 + bands * read_units / 2,
    }


def _vcpu(memory_mb: int) -> float:
    return memory_mb / _a("mb_per_vcpu")


def predict(
    measured: Measured, gigapixels: float, tile_size: int, concurrency: int
) -> dict[str, Any]:
    """Predicted stage times, cost and limits for a square image of ``gigapixels``."""
    pixels = gigapixels * 1e9
    mp = pixels / 1e6
    side = math.sqrt(pixels)
    tiles = math.ceil(side / tile_size) ** 2
    items = math.ceil(tiles / TILES_PER_ITEM)
    net = _a("network_mb_per_s") * 1e6
    s3 = _a("s3_request_latency_s")
    ddb = _a("dynamodb_request_latency_s")
    tile_px = tile_size * tile_size
    bytes_in = measured.tile_bytes_in_per_px[tile_size] * tile_px
    bytes_out = measured.tile_bytes_out_per_px[tile_size] * tile_px
    source_bytes = measured.source_bytes_per_px * pixels
    output_bytes = measured.output_bytes_per_px * pixels
    cold = measured.init_s + _a("runtime_init_s")

    # Splitter: fetch the upload, decode it once (one thread), cut and store the tiles (16
    # threads: CPU-, network- or latency-bound, whichever is slowest), write the tile items.
    split_vcpu = _vcpu(SPLITTER_MB)
    split = {
        "fetch": source_bytes / net + s3,
        "decode": mp / measured.split_decode_mp_per_cpu_s / min(1.0, split_vcpu),
        "cut_and_store": max(
            mp * measured.split_cut_cpu_s_per_mp / split_vcpu,
            tiles * bytes_in / net,
            tiles * s3 / IO_THREADS,
        ),
        "tile_items": math.ceil(tile_state_units(tiles)["band_items"] / 25) * ddb,
        "cold_start": cold,
    }
    # A tile: fetch, compute, store. An item: its dispatch, two job reads and two tile-state
    # writes (the batch's start and end).
    worker_vcpu = _vcpu(WORKER_MB)
    tile_s = (
        2 * s3
        + (bytes_in + bytes_out) / net
        + measured.tile_cpu_s_per_mp[tile_size] * tile_px / 1e6 / min(worker_vcpu, 2.0)
    )
    item_s = _a("item_dispatch_s") + 4 * ddb + TILES_PER_ITEM * tile_s
    lanes = max(1, min(concurrency, items))
    # Above 1,000 environments, each further thousand arrives 10 s later.
    ramp = max(0, math.ceil(lanes / _a("scaling_envs_per_10s")) - 1) * 10.0
    waves = math.ceil(items / lanes)
    map_s = cold + ramp + waves * item_s
    # Merger: fetch the output tiles (16 threads), decode them into strips, encode the output
    # on one thread, upload it in 64 MiB parts.
    merge_vcpu = _vcpu(MERGER_MB)
    merge = {
        "fetch": max(tiles * bytes_out / net, tiles * s3 / IO_THREADS),
        "assemble": mp * measured.merge_decode_cpu_s_per_mp / merge_vcpu,
        "encode": mp / measured.merge_encode_mp_per_cpu_s / min(1.0, merge_vcpu),
        "upload": output_bytes / net + s3,
        "progress_read": 2 * ddb,
        "cold_start": cold,
    }
    split_s, merge_s = sum(split.values()), sum(merge.values())
    wall = split_s + map_s + merge_s

    units = tile_state_units(tiles)
    gb_s = (
        SPLITTER_MB / 1024 * split_s
        + WORKER_MB / 1024 * (items * item_s + lanes * cold)
        + MERGER_MB / 1024 * merge_s
    )
    cost = {
        "lambda_duration": gb_s * _a("price_gb_s_arm64"),
        "lambda_requests": (items + 2) * _a("price_per_request_lambda"),
        "step_functions": (6 + 2 * items) * _a("price_per_transition"),
        "s3_requests": (2 * tiles + 2 + math.ceil(output_bytes / PART_BYTES)) * _a("price_s3_put")
        + (2 * tiles + 2) * _a("price_s3_get"),
        "dynamodb": (units["split_write_units"] + units["worker_write_units"] + 10)
        * _a("price_ddb_write")
        + (units["worker_job_reads"] + units["merge_check_read_units"] + 5) * _a("price_ddb_read"),
    }
    tmp_mb = _a("tmp_mb")
    limits = {
        "split_within_timeout": split_s <= _a("timeout_s"),
        "merge_within_timeout": merge_s <= _a("timeout_s"),
        "split_fits_tmp": (source_bytes + pixels * BANDS) / 2**20 <= tmp_mb,
        "merge_fits_tmp": (pixels * BANDS + output_bytes) / 2**20 <= tmp_mb,
        "worker_fits_memory": measured.worker_peak_mb.get(tile_size, 0) <= WORKER_MB,
    }
    stages = {"split": split_s, "map": map_s, "merge": merge_s}
    return {
        "gigapixels": gigapixels,
        "tile_size": tile_size,
        "concurrency": concurrency,
        "tiles": tiles,
        "items": items,
        "tile_s": tile_s,
        "item_s": item_s,
        "split_s": split_s,
        "split_parts": split,
        "map_s": map_s,
        "merge_s": merge_s,
        "merge_parts": merge,
        "wall_s": wall,
        "bottleneck": max(stages, key=lambda name: stages[name]),
        "cost_usd": sum(cost.values()),
        "cost_parts": cost,
        "cost_per_gp_usd": sum(cost.values()) / gigapixels,
        "feasible": all(limits.values()),
        "limits": limits,
    }


def sweep(
    measured: Measured,
    gigapixels: Sequence[float],
    tile_sizes: Sequence[int],
    concurrencies: Sequence[int],
) -> list[dict[str, Any]]:
    """Every combination that the measurements cover."""
    return [
        predict(measured, size, tile, workers)
        for size in gigapixels
        for tile in tile_sizes
        if tile in measured.tile_cpu_s_per_mp
        for workers in concurrencies
    ]


def recommend(predictions: Sequence[Mapping[str, Any]], concurrency: int) -> dict[str, Any]:
    """The tile size with the lowest wall time at ``concurrency``, summed over image sizes
    (ties within 5% go to the cheaper one), and where the serial stages stop fitting."""
    rows = [row for row in predictions if row["concurrency"] == concurrency]
    sizes = sorted({row["gigapixels"] for row in rows})
    tiles = sorted({row["tile_size"] for row in rows})

    def total(tile: int, field: str) -> float:
        return float(sum(row[field] for row in rows if row["tile_size"] == tile))

    best_wall = min(total(tile, "wall_s") for tile in tiles)
    close = [tile for tile in tiles if total(tile, "wall_s") <= best_wall * 1.05]
    tile = min(close, key=lambda t: total(t, "cost_usd"))
    chosen = [row for row in rows if row["tile_size"] == tile]
    first_serial = next((row["gigapixels"] for row in chosen if row["bottleneck"] != "map"), None)
    first_infeasible = next((row for row in chosen if not row["feasible"]), None)
    return {
        "concurrency": concurrency,
        "tile_size": tile,
        "image_sizes_gp": sizes,
        "serial_stage_dominates_from_gp": first_serial,
        "first_infeasible": None
        if first_infeasible is None
        else {
            "gigapixels": first_infeasible["gigapixels"],
            "broken": [name for name, ok in first_infeasible["limits"].items() if not ok],
        },
    }


def largest_within(
    measured: Measured,
    tile_size: int,
    concurrency: int,
    condition: Any,
    *,
    high: float = 100.0,
) -> float | None:
    """The largest image (GP, to 1%) for which ``condition(prediction)`` still holds."""
    low = 0.001
    if not condition(predict(measured, low, tile_size, concurrency)):
        return None
    if condition(predict(measured, high, tile_size, concurrency)):
        return high
    while high / low > 1.01:
        middle = math.sqrt(low * high)
        if condition(predict(measured, middle, tile_size, concurrency)):
            low = middle
        else:
            high = middle
    return round(low, 3)


def limits_table(
    measured: Measured, tile_size: int, concurrencies: Sequence[int]
) -> list[dict[str, Any]]:
    """For each concurrency: up to what size the map stage dominates, and where each hard
    limit of the serial stages is reached."""
    rows = []
    for workers in concurrencies:
        rows.append(
            {
                "tile_size": tile_size,
                "concurrency": workers,
                "map_dominates_up_to_gp": largest_within(
                    measured,
                    tile_size,
                    workers,
                    lambda p: p["map_s"] >= max(p["split_s"], p["merge_s"]),
                ),
                "split_within_timeout_up_to_gp": largest_within(
                    measured, tile_size, workers, lambda p: p["limits"]["split_within_timeout"]
                ),
                "merge_within_timeout_up_to_gp": largest_within(
                    measured, tile_size, workers, lambda p: p["limits"]["merge_within_timeout"]
                ),
                "split_fits_tmp_up_to_gp": largest_within(
                    measured, tile_size, workers, lambda p: p["limits"]["split_fits_tmp"]
                ),
                "merge_fits_tmp_up_to_gp": largest_within(
                    measured, tile_size, workers, lambda p: p["limits"]["merge_fits_tmp"]
                ),
            }
        )
    return rows

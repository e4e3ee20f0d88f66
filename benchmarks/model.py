"""A Lambda-scale model: wall time and cost per gigapixel from measured costs and sourced numbers.

Nothing here is measured on AWS. The model takes what the harness measured on this machine (CPU
seconds per tile on one thread, bytes per tile, the serial stages' decode and encode rates, the
handler import time) and the published numbers in ``ASSUMPTIONS`` (each with its source), and
predicts each stage of a job on Lambda. Numbers marked ``assumed`` have no published source that
we found; their effect is stated next to them.

The stages are the ones built: the splitter reads a tiled TIFF's header by range (or transcodes
any other input once, on one thread, into a tiled deflate TIFF uploaded by multipart), workers
prefetch their blocks (one ranged GET per row of TIFF tiles, 8 in flight) and write their
result tiles already encoded (one object per manifest item, with their pyramid levels), and
the merger writes the TIFF's header and IFDs and assembles the result by multipart upload,
copying the workers' objects server-side.

    python -m benchmarks.model benchmarks/results/500mp/results.json   # the headline figures
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from tilefan.imaging.plan import WORKER_RUNTIME_MB
from tilefan.stages.reduction import FANOUT_SIDE, GROUP_BYTES
from tilefan.state.multipart import MIN_PART
from tilefan.state.ranged import REQUEST_BYTES, REQUESTS_IN_FLIGHT

if TYPE_CHECKING:
    from tilefan.imaging.plan import TilePlan

__all__ = [
    "ASSUMPTIONS",
    "LARGEST_JPEG_GP",
    "Measured",
    "headline",
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
    "s3_small_get_latency_s": {
        "value": 0.05,
        "note": (
            "first byte of one ranged GET (a row of a block's TIFF tiles, 0.2-2.6 MB): 'median "
            "latency often in the tens of milliseconds'. A block's rows go out at once, 8 in "
            "flight, so a block waits 1-3 of these; at 150 ms the 10 GP map at 2048 px takes "
            "about 1.1x as long"
        ),
        "source": "https://docs.aws.amazon.com/whitepapers/latest/s3-optimizing-performance-"
        "best-practices/timeouts-and-retries-for-latency-sensitive-applications.html",
    },
    "s3_request_mb_per_s": {
        "value": 85.0,
        "note": (
            "what one GET request delivers once it flows: 'one concurrent request for each "
            "85-90 MB/s of desired network throughput' (recalled from the guidelines, not "
            "checked against the page). A worker's 8 block requests share the function's "
            "network, which is then the bound"
        ),
        "source": "https://docs.aws.amazon.com/AmazonS3/latest/userguide/"
        "optimizing-performance-guidelines.html",
    },
    "copy_mb_per_s": {
        "value": 100.0,
        "note": (
            "assumed: server-side bytes per second of one UploadPartCopy request, after its "
            "request latency; no published figure found. At 25 MB/s the 10 GP merge's copies "
            "take about 4x as long (they run 16 at a time)"
        ),
        "source": "assumed",
    },
    "complete_multipart_s": {
        "value": 2.0,
        "note": (
            "assumed: CompleteMultipartUpload of a few thousand parts. The API reference says "
            "only that it 'could take several minutes'; each +10 s adds 10 s to the merge"
        ),
        "source": "assumed; https://docs.aws.amazon.com/AmazonS3/latest/API/"
        "API_CompleteMultipartUpload.html",
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
        "note": (
            "S3 Standard PUT/COPY/POST/LIST, per request: UploadPart, UploadPartCopy, "
            "Create/CompleteMultipartUpload and ListObjectsV2 are each one"
        ),
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
"""Concurrent S3 requests of the merger (index reads, part copies, small range reads)."""
PART_BYTES = 8 * 2**20
"""The transcode's and the merger's plain multipart parts."""
PLAIN_PARTS_IN_FLIGHT = 4
COMPACTION_MAX_GROUP = 64
"""Batches per compaction group at most (`stages/compaction.py`'s ``_MAX_GROUP``)."""
"""The merger's plain parts in flight (`tilefan.state.multipart`), plus the one gathering."""
TIFF_TILE = 256
"""The TIFF tile edge of the transcoded intermediate and of the result."""
HEADER_REQUESTS = 4
"""Ranged GETs the splitter makes to read a tiled TIFF's header and directory (measured: at
most 4, tests/integration/test_range_reads.py)."""
SPLITTER_PEAK_MB = 190.0
"""The splitter's peak resident memory, measured flat: 88-90 MB for a tiled TIFF from 100 MP to
2 GP, 180 MB for the JPEG transcode at 100 MP (docs/benchmarks.md)."""
BANDS = 3


def _a(name: str) -> float:
    return float(ASSUMPTIONS[name]["value"])


@dataclass(frozen=True)
class Measured:
    """What the harness measured on this machine, per unit of work, for one chain."""

    tile_cpu_s_per_mp: Mapping[int, float]
    """CPU seconds per output megapixel of a tile worker, by tile size (one thread): decoding
    its source block, the chain, encoding its result tiles."""
    tile_bytes_in_per_px: Mapping[int, float]
    """Bytes of the (compressed) source read per source pixel."""
    tile_bytes_out_per_px: Mapping[int, float]
    """Bytes of encoded result tiles per output pixel."""
    transcode_mp_per_cpu_s: float
    """The splitter's transcode of a JPEG (decode, then the tiled deflate-1 TIFF), one thread."""
    transcode_bytes_per_px: float
    merge_encode_mp_per_cpu_s: float
    """libvips' deflate TIFF encode, one thread: the merger encodes the coarse pyramid levels."""
    output_bytes_per_px: float
    source_bytes_per_px: float
    """The JPEG upload's bytes per pixel."""
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
        transcode: Mapping[str, float] | None = None,
    ) -> Measured:
        """From ``benchmarks.kernel``'s result for one tile encoding (the result's compression).

        ``transcode`` (``mp_per_cpu_s``, ``bytes_per_pixel``) replaces the kernel's own
        transcode figures, for results measured before the kernel recorded its bytes.
        """
        rows = [row for row in kernel["tiles"] if row["encoding"] == encoding]
        by_size = {int(row["tile_size"]): row for row in rows}

        def per_mp(row: Mapping[str, Any], field: str) -> float:
            return float(row[field]) / (float(row["output_pixels"]) / 1e6)

        deflate = kernel["merge_encode"]["deflate"]
        split = transcode or kernel["split_decode"]
        return cls(
            tile_cpu_s_per_mp={size: per_mp(row, "cpu_s") for size, row in by_size.items()},
            tile_bytes_in_per_px={
                size: row["bytes_in"] / row["source_pixels"] for size, row in by_size.items()
            },
            tile_bytes_out_per_px={
                size: row["bytes_out"] / row["output_pixels"] for size, row in by_size.items()
            },
            transcode_mp_per_cpu_s=float(split["mp_per_cpu_s"]),
            transcode_bytes_per_px=float(split["bytes_per_pixel"]),
            merge_encode_mp_per_cpu_s=float(deflate["mp_per_cpu_s"]),
            output_bytes_per_px=float(kernel["merge_encode"][encoding]["bytes_per_pixel"]),
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


def _tiles_per_item(side: int, tile_size: int, compression: str, pyramid: bool) -> int:
    """The splitter's batch size for a square TIFF result (`tilefan.stages.tiff_output`'s
    rule)."""
    from tilefan.stages.tiff_output import tiles_per_item

    across = math.ceil(side / tile_size)
    plan = SimpleNamespace(
        output_tile=tile_size,
        output_width=side,
        output_height=side,
        tile_count=across**2,
        output=SimpleNamespace(bands=BANDS, format="uchar"),
    )
    options = {"compression": compression, "pyramid": pyramid}
    return tiles_per_item(cast("TilePlan", plan), options, TILES_PER_ITEM)


def _worker_levels(tile_size: int, pyramid: bool) -> int:
    """Pyramid levels a worker encodes for its own block (`tiff_output.worker_levels`)."""
    return int(math.log2(tile_size // TIFF_TILE)) + 1 if pyramid else 1


def predict(
    measured: Measured,
    gigapixels: float,
    tile_size: int,
    concurrency: int,
    *,
    source: str = "tiled",
    pyramid: bool = False,
    compression: str = "deflate",
    prefetch: bool = True,
    batch_tiles: int | None = None,
) -> dict[str, Any]:
    """Predicted stage times, cost and limits for a square image of ``gigapixels``.

    ``source`` is ``"tiled"`` (a tiled TIFF upload, read where it is) or ``"jpeg"``
    (transcoded once by the splitter); the result is a tiled TIFF, a COG when ``pyramid``.
    ``prefetch=False`` models the block read before the prefetch (libtiff's reads, one TIFF
    tile per ranged GET, one after another), for comparison; ``batch_tiles`` sets the tiles
    per manifest item instead of the splitter's rule.
    """
    pixels = gigapixels * 1e9
    mp = pixels / 1e6
    side = math.sqrt(pixels)
    tiles = math.ceil(side / tile_size) ** 2
    per_item = batch_tiles or _tiles_per_item(round(side), tile_size, compression, pyramid)
    items = math.ceil(tiles / per_item)
    net = _a("network_mb_per_s") * 1e6
    s3 = _a("s3_request_latency_s")
    small_get = _a("s3_small_get_latency_s")
    ddb = _a("dynamodb_request_latency_s")
    tile_px = tile_size * tile_size
    cold = measured.init_s + _a("runtime_init_s")
    levels = _worker_levels(tile_size, pyramid)
    units = tile_state_units(tiles, per_item)

    # Splitter: the header by a few ranged GETs, the job's records and the manifest; a JPEG
    # is first transcoded on one thread while its bytes stream in and the parts go out.
    split_vcpu = _vcpu(SPLITTER_MB)
    transcode_bytes = measured.transcode_bytes_per_px * pixels if source == "jpeg" else 0.0
    transcode_s = 0.0
    if source == "jpeg":
        transcode_s = max(
            mp / measured.transcode_mp_per_cpu_s / min(1.0, split_vcpu),
            (measured.source_bytes_per_px * pixels + transcode_bytes) / net,
        )
    split = {
        "cold_start": cold,
        "header": HEADER_REQUESTS * small_get,
        "transcode": transcode_s,
        "records": math.ceil(units["band_items"] / 25) * ddb + 3 * ddb,
        "manifest": s3,
    }

    # A tile: its source block (the TIFF tiles under the tile and its halo) fetched before
    # libvips crops: one ranged GET per row of TIFF tiles (a row lies end to end in the file),
    # up to 8 at once, then the chain, its result tiles and (for a COG) its levels encoded.
    # Without the prefetch, libtiff fetched one TIFF tile per GET, one after another.
    tiff_tiles_across = tile_size / TIFF_TILE + 2
    read_px = tiff_tiles_across**2 * TIFF_TILE**2
    bytes_in = measured.tile_bytes_in_per_px[tile_size] * read_px
    if prefetch:
        row_bytes = bytes_in / tiff_tiles_across
        reads_per_tile = tiff_tiles_across * math.ceil(row_bytes / REQUEST_BYTES)
        read_rounds = math.ceil(reads_per_tile / REQUESTS_IN_FLIGHT)
        read_mb_per_s = min(_a("network_mb_per_s"), REQUESTS_IN_FLIGHT * _a("s3_request_mb_per_s"))
    else:
        reads_per_tile = read_rounds = tiff_tiles_across**2
        read_mb_per_s = min(_a("network_mb_per_s"), _a("s3_request_mb_per_s"))
    # A COG's worker levels add a third to the encoded bytes.
    bytes_out = measured.tile_bytes_out_per_px[tile_size] * tile_px * (4 / 3 if levels > 1 else 1)
    worker_vcpu = _vcpu(WORKER_MB)
    pyramid_cpu = (levels > 1) * tile_px / 3 / 1e6 / measured.merge_encode_mp_per_cpu_s
    tile_s = (
        read_rounds * small_get
        + bytes_in / (read_mb_per_s * 1e6)
        + (measured.tile_cpu_s_per_mp[tile_size] * tile_px / 1e6 + pyramid_cpu)
        / min(worker_vcpu, 2.0)
    )
    # An item: dispatch, two job reads, two tile-state writes, its tiles, then its tiles
    # object, each of its levels that passes 5 MiB copied into the result's upload at the
    # part number reserved for it (`prepare_assembly`), all at once (the largest is the
    # wait), its levels' pieces (COG) and its index.
    item_writes = 2 + (levels > 1)
    item_bytes = per_item * tile_px * measured.tile_bytes_out_per_px[tile_size]
    item_copies = [item_bytes / 4**level for level in range(levels)]
    item_copies = [size for size in item_copies if size >= MIN_PART]
    item_s = (
        _a("item_dispatch_s")
        + 4 * ddb
        + per_item * tile_s
        + item_writes * s3
        + per_item * bytes_out / net
        + (s3 + max(item_copies) / (_a("copy_mb_per_s") * 1e6) if item_copies else 0.0)
    )
    lanes = max(1, min(concurrency, items))
    # Above 1,000 environments, each further thousand arrives 10 s later.
    ramp = max(0, math.ceil(lanes / _a("scaling_envs_per_10s")) - 1) * 10.0
    waves = math.ceil(items / lanes)
    map_s = cold + ramp + waves * item_s

    # Merger: list and read the batches' indexes (16 at a time), for a COG fetch the blocks'
    # pieces group by group (at most `GROUP_BYTES` each) and encode the levels above them on
    # one thread into an object per group, then assemble: list the upload's parts, keep the
    # workers' copies, copy the joined groups' ranges of at least 5 MiB (and, per level, the
    # rest of the range its short part is topped up from), read smaller ones and send them
    # as plain parts, 16 requests in flight.
    merge_vcpu = _vcpu(MERGER_MB)
    # A COG of more batches than one group holds: the second fan-out joins each group's small
    # levels into one object first (`stages/compaction.py`), a group to each tile worker,
    # warm from the map, all at once; the merge then copies those ranges where they pass 5 MiB.
    group = min(
        COMPACTION_MAX_GROUP, max(2, math.ceil(MIN_PART / (item_bytes / 4 ** (levels - 1))))
    )
    small = [level for level in range(levels) if item_bytes / 4**level < MIN_PART]
    compact_groups = math.ceil(items / group) if pyramid and small and items > group else 0
    compact: dict[str, float] = {}
    joined = group * sum(item_bytes / 4**level for level in small) if compact_groups else 0.0
    if compact_groups:
        compact = {
            "indexes": group / IO_THREADS * s3,
            "ranges": (group * len(small) + math.ceil(joined / PART_BYTES) + 2) * s3 / IO_THREADS,
            "gather": 2 * joined / net,
            # A few parts, not the result's thousands: assumed one request's latency.
            "complete": s3,
        }
    # The first level no block holds whole, when wider than one fan-out group: the second
    # fan-out's tasks reduce it a `FANOUT_SIDE` square each (its levels down to one tile
    # a side), alongside the compaction groups; the merger starts that many levels down.
    first_side = math.sqrt(pixels / 4**levels) if pyramid else 0.0
    reduce_groups = math.ceil(first_side / FANOUT_SIDE) ** 2 if first_side > FANOUT_SIDE else 0
    fanned = int(math.log2(FANOUT_SIDE // TIFF_TILE)) + 1 if reduce_groups else 0
    reduce: dict[str, float] = {}
    under = 0
    if reduce_groups:
        group_px = FANOUT_SIDE**2
        # The batches under a group: its square at level 0, a row of batches per tile row.
        under = math.ceil((FANOUT_SIDE << levels) / tile_size) * max(
            1, math.ceil((FANOUT_SIDE << levels) / tile_size / per_item)
        )
        reduce = {
            "indexes": math.ceil(under / IO_THREADS) * s3,
            "pieces": math.ceil(under / IO_THREADS) * s3 + group_px * BANDS / net,
            "encode": group_px
            * 4
            / 3
            / 1e6
            / measured.merge_encode_mp_per_cpu_s
            / min(1.0, worker_vcpu),
            # Its tiles, pieces and index.
            "write": 3 * s3 + group_px * 4 / 3 * measured.output_bytes_per_px / net,
        }
    fanout_items = compact_groups + reduce_groups
    # The map's environments are warm; items past them wait for new ones' cold starts.
    fanout_lanes = max(1, min(concurrency, fanout_items))
    fanout_s = (
        (cold if fanout_lanes > lanes else 0.0)
        + math.ceil(fanout_items / fanout_lanes) * max(sum(compact.values()), sum(reduce.values()))
        if fanout_items
        else 0.0
    )
    copies, copied, gathered, small_reads = 0, 0.0, 0.0, 0
    for level in range(levels):
        # The ranges the merger takes for a level: a batch's, copied by its worker when it
        # passes 5 MiB, or a group's when joined.
        if compact_groups and level in small:
            count, size = compact_groups, group * item_bytes / 4**level
        else:
            count, size = items, item_bytes / 4**level
            if size >= MIN_PART:
                # The range its short part before them is topped up from, copied again.
                copies, copied = copies + 1, copied + size
                continue
        if size >= MIN_PART:
            copies, copied = copies + count, copied + count * size
        else:
            gathered, small_reads = gathered + count * size, small_reads + count
    # The levels coarser than a block, down to one TIFF tile: encoded by the merger, below
    # those the fan-out reduced; all their tiles pass through it, a range per fan-out level.
    coarse_bytes = measured.output_bytes_per_px * (
        sum(pixels / 4**level for level in range(levels, 64) if pixels / 4**level >= TIFF_TILE**2)
        if pyramid
        else 0.0
    )
    coarse_px = (
        sum(
            pixels / 4**level
            for level in range(levels + fanned, 64)
            if pixels / 4**level >= TIFF_TILE**2
        )
        if pyramid
        else 0.0
    )
    small_reads += reduce_groups * fanned
    pieces_bytes = pixels / 4 ** (levels + fanned) * BANDS if pyramid else 0.0
    coarse_groups = math.ceil(pieces_bytes / GROUP_BYTES)
    plain_parts = math.ceil((gathered + coarse_bytes) / PART_BYTES) + 1
    worker_copies = items * len(item_copies)
    merge = {
        "cold_start": cold,
        "progress_read": 2 * ddb,
        "list": math.ceil(3 * items / 1000) * s3,
        "indexes": (items + reduce_groups) / IO_THREADS * s3,
        "pieces": ((reduce_groups or items) / IO_THREADS * s3 + pieces_bytes / net)
        if pyramid
        else 0.0,
        "coarse_encode": coarse_px
        / 1e6
        / measured.merge_encode_mp_per_cpu_s
        / min(1.0, merge_vcpu),
        # Each group's tiles, pieces and index written, in turn.
        "coarse_write": 3 * coarse_groups * s3 + coarse_px * measured.output_bytes_per_px / net,
        "assemble": max(
            (copies * s3 + copied / (_a("copy_mb_per_s") * 1e6)) / IO_THREADS
            + (small_reads + plain_parts) * s3 / IO_THREADS,
            # What is gathered comes in and goes out through the merger's network.
            2 * (gathered + coarse_bytes) / net,
        ),
        # The workers' copies, checked in the upload's list of parts (1,000 a page).
        "list_parts": math.ceil((worker_copies + copies + plain_parts) / 1000) * s3,
        "complete": _a("complete_multipart_s"),
    }
    split_s, merge_s = sum(split.values()), sum(merge.values())
    wall = split_s + map_s + fanout_s + merge_s

    gb_s = (
        SPLITTER_MB / 1024 * split_s
        + WORKER_MB / 1024 * (items * item_s + lanes * cold)
        + MERGER_MB / 1024 * merge_s
        + WORKER_MB / 1024 * compact_groups * sum(compact.values())
        + WORKER_MB / 1024 * reduce_groups * sum(reduce.values())
    )
    transcode_parts = math.ceil(transcode_bytes / PART_BYTES) + 2 if source == "jpeg" else 0
    puts = (
        1  # manifest
        + transcode_parts
        + items * item_writes
        + math.ceil(3 * items / 1000)  # the merger's listings
        + copies
        + worker_copies
        + plain_parts
        + 3 * coarse_groups
        # Each group's multipart object (its parts) and index.
        + compact_groups * (math.ceil(joined / PART_BYTES) + 3)
        + 3 * reduce_groups  # a reduced group's tiles, pieces and index
        + 2  # create and complete the result's upload
    )
    gets = (
        HEADER_REQUESTS
        + (math.ceil(measured.source_bytes_per_px * pixels / PART_BYTES) if source == "jpeg" else 0)
        + tiles * reads_per_tile
        + items * (1 + (levels > 1))  # indexes, pieces
        + small_reads
        + compact_groups * group * (1 + len(small))  # a group's indexes and small ranges
        + reduce_groups * 2 * under  # the indexes and pieces under each group
    )
    cost = {
        "lambda_duration": gb_s * _a("price_gb_s_arm64"),
        "lambda_requests": (items + fanout_items + 3) * _a("price_per_request_lambda"),
        "step_functions": (7 + 2 * (items + fanout_items)) * _a("price_per_transition"),
        "s3_requests": puts * _a("price_s3_put") + gets * _a("price_s3_get"),
        "dynamodb": (units["split_write_units"] + units["worker_write_units"] + 10)
        * _a("price_ddb_write")
        + (units["worker_job_reads"] + units["merge_check_read_units"] + 5) * _a("price_ddb_read"),
    }
    # The merger holds every batch's index (about 40 bytes per tile and level), one group of
    # the coarse levels' raw pixels (COG) about three times, and the plain parts in flight.
    merge_memory_mb = (
        150
        + tiles * levels * 40 / 2**20
        + 3 * min(pieces_bytes, GROUP_BYTES) / 2**20
        + (PLAIN_PARTS_IN_FLIGHT + 1) * PART_BYTES / 2**20
    )
    # The measured peak (the chain's copies of the block, while the reader keeps at most
    # `CACHED_BYTES`), or the crop's: the decoded block beside its prefetched bytes, which the
    # reader drops past `CACHED_BYTES` before the chain runs (`RangedObject.settle`).
    # Beside it, the batch's encoded levels, held until its object is written.
    held_mb = per_item * tile_px * measured.tile_bytes_out_per_px[tile_size] / 2**20
    worker_memory_mb = held_mb * (4 / 3 if pyramid else 1) + max(
        measured.worker_peak_mb.get(tile_size, 0),
        WORKER_RUNTIME_MB + (tile_size + 2 * TIFF_TILE) ** 2 * BANDS / 2**20 + bytes_in / 2**20,
    )
    limits = {
        "split_within_timeout": split_s <= _a("timeout_s"),
        "merge_within_timeout": merge_s <= _a("timeout_s"),
        "fanout_within_timeout": max(sum(compact.values()), sum(reduce.values()))
        <= _a("timeout_s"),
        "worker_within_timeout": item_s <= _a("timeout_s"),
        "split_fits_memory": SPLITTER_PEAK_MB <= SPLITTER_MB,
        "merge_fits_memory": merge_memory_mb <= MERGER_MB,
        "worker_fits_memory": worker_memory_mb <= WORKER_MB,
        "parts_within_10000": worker_copies + copies + plain_parts <= 10_000,
        # Neither serial stage writes to /tmp any more.
        "fits_tmp": True,
    }
    stages = {"split": split_s, "map": map_s, "fanout": fanout_s, "merge": merge_s}
    return {
        "gigapixels": gigapixels,
        "tile_size": tile_size,
        "concurrency": concurrency,
        "source": source,
        "pyramid": pyramid,
        "tiles": tiles,
        "items": items,
        "tiles_per_item": per_item,
        "tile_s": tile_s,
        "tile_read_s": read_rounds * small_get + bytes_in / (read_mb_per_s * 1e6),
        "tile_read_requests": reads_per_tile,
        "item_s": item_s,
        "split_s": split_s,
        "split_parts": split,
        "map_s": map_s,
        "fanout_s": fanout_s,
        "compaction_groups": compact_groups,
        "compact_parts": compact,
        "reduce_groups": reduce_groups,
        "reduce_parts": reduce,
        "merge_s": merge_s,
        "merge_parts": merge,
        "merge_requests": {
            "copies": copies,
            "worker_copies": worker_copies,
            "small_reads": small_reads,
            "plain_parts": plain_parts,
        },
        "merge_gathered_mb": gathered / 1e6,
        "merge_memory_mb": merge_memory_mb,
        "worker_memory_mb": worker_memory_mb,
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
    **options: Any,
) -> float | None:
    """The largest image (GP, to 1%) for which ``condition(prediction)`` still holds."""
    low = 0.001

    def holds(gigapixels: float) -> bool:
        return bool(condition(predict(measured, gigapixels, tile_size, concurrency, **options)))

    if not holds(low):
        return None
    if holds(high):
        return high
    while high / low > 1.01:
        middle = math.sqrt(low * high)
        if holds(middle):
            low = middle
        else:
            high = middle
    return round(low, 3)


def limits_table(
    measured: Measured, tile_size: int, concurrencies: Sequence[int], **options: Any
) -> list[dict[str, Any]]:
    """For each concurrency: up to what size the map stage is the longest, and where each
    limit of the serial stages is reached (``options`` as for `predict`)."""
    rows = []
    for workers in concurrencies:

        def upto(condition: Any, workers: int = workers) -> float | None:
            return largest_within(measured, tile_size, workers, condition, **options)

        rows.append(
            {
                "tile_size": tile_size,
                "concurrency": workers,
                "map_dominates_up_to_gp": upto(
                    lambda p: p["map_s"] >= max(p["split_s"], p["merge_s"])
                ),
                "split_within_timeout_up_to_gp": upto(
                    lambda p: p["limits"]["split_within_timeout"]
                ),
                "merge_within_timeout_up_to_gp": upto(
                    lambda p: p["limits"]["merge_within_timeout"]
                ),
                "merge_fits_memory_up_to_gp": upto(lambda p: p["limits"]["merge_fits_memory"]),
                "parts_within_10000_up_to_gp": upto(lambda p: p["limits"]["parts_within_10000"]),
            }
        )
    return rows


LARGEST_JPEG_GP = 65_535**2 / 1e9
"""JPEG's own limit: 65,535 px a side."""


def headline(measured: Measured) -> dict[str, Any]:
    """The figures issues 10 and 11 ask of the model, with the tile size that meets them.

    A 10 GP tiled TIFF to a COG at concurrency 1,000 (each tile size the kernel measured, as
    built), the same before the block prefetch (for the ratio), with batches sized for level 0
    only (the splitter's rule before it sized a COG's for its first three levels), and the
    largest JPEG (65,535 px a side) to a COG, with its transcode.
    """
    sizes = [tile for tile in sorted(measured.tile_cpu_s_per_mp) if tile >= 1024]
    cog = [predict(measured, 10, tile, 1000, pyramid=True) for tile in sizes]
    best = min(cog, key=lambda p: p["wall_s"])
    before = [predict(measured, 10, tile, 1000, pyramid=True, prefetch=False) for tile in sizes]
    jpeg = predict(measured, LARGEST_JPEG_GP, best["tile_size"], 1000, source="jpeg", pyramid=True)
    side = round(math.sqrt(10e9))
    level_0_batches = [
        predict(
            measured,
            10,
            tile,
            1000,
            pyramid=True,
            batch_tiles=_tiles_per_item(side, tile, "deflate", pyramid=False),
        )
        for tile in sizes
    ]
    return {
        "cog_10gp": cog,
        "best_tile": best["tile_size"],
        "cog_10gp_before_prefetch": before,
        "largest_jpeg": jpeg,
        "cog_10gp_level_0_batches": level_0_batches,
    }


def main() -> None:
    """Print the headline figures from a run's ``results.json`` (its kernel and memory)."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, help="a results.json with a kernel section")
    parser.add_argument(
        "--transcode",
        help="MP_PER_CPU_S,BYTES_PER_PIXEL of the transcode, for runs that predate its bytes",
    )
    args = parser.parse_args()
    document = json.loads(args.results.read_text())
    kernel, model = document["kernel"], document["model"]
    transcode = None
    if args.transcode:
        rate, size = (float(value) for value in args.transcode.split(","))
        transcode = {"mp_per_cpu_s": rate, "bytes_per_pixel": size}
    measured = Measured.from_kernel(
        kernel,
        encoding="deflate",
        source_bytes_per_px=float(kernel["source_bytes_per_px"]),
        init_s=float(model["init_s_used"]),
        worker_peak_mb={int(k): float(v) for k, v in model["worker_peak_mb_used"].items()},
        transcode=transcode,
    )
    print(json.dumps(headline(measured), indent=2))


if __name__ == "__main__":
    main()

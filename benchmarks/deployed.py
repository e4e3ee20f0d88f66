"""The same sweep against a deployment, through the REST API client (`tilefan submit`).

Only what the API exposes is recorded: stage timings from the job document, tile durations from
``GET /jobs/{id}/tiles``, and wall times seen by the client. Bytes moved and memory are not
visible from outside a deployment; the job's tile encoding and batch size are the deployment's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.chains import CHAINS
from benchmarks.embedded import _percentiles

__all__ = ["run_deployed"]


def run_deployed(
    case: Mapping[str, Any], source: Path, api: str, key: str | None
) -> dict[str, Any]:
    """Create, upload, start, follow and download one job on the deployment at ``api``."""
    from tilefan.service.client import TilefanClient

    client = TilefanClient(api, key)
    result: dict[str, Any] = {"deployed": True, "api": api}
    try:
        with tempfile.TemporaryDirectory(prefix="tilefan-deployed-") as scratch:
            started = time.monotonic()
            submission = client.submit(
                source,
                Path(scratch) / "result.tif",
                CHAINS[case["chain"]],
                output_format="tiff",
                tile_size=int(case["tile_size"]),
                poll_seconds=1.0,
            )
            finished = time.monotonic()
            output_bytes = (Path(scratch) / "result.tif").stat().st_size
    except Exception as e:  # one failed job is recorded; the sweep goes on
        return {**result, "error": f"{type(e).__name__}: {e}"}
    job = submission.job
    durations: list[int] = []
    cursor: str | None = None
    try:
        while True:
            query = "limit=500" + (f"&cursor={cursor}" if cursor else "")
            page = client.request("GET", f"/jobs/{job['job_id']}/tiles?{query}")
            durations += [t["duration_ms"] for t in page.get("tiles", []) if t.get("duration_ms")]
            cursor = page.get("next_cursor")
            if not cursor:
                break
    except Exception as e:  # the job's own figures still stand without the tile detail
        result["tiles_error"] = f"{type(e).__name__}: {e}"
    tiles = job.get("tiles") or {}
    timings = dict(job.get("timings", {}))
    output = job.get("output") or {}
    result.update(
        status=job.get("status"),
        timings=timings,
        end_to_end_s=finished - started,
        execution_s=sum(timings.values()),
        output_bytes=output_bytes,
        output_pixels=int(output.get("width", 0)) * int(output.get("height", 0)),
        tile_count=int(tiles.get("total", len(durations))),
        tile_ms=_percentiles(durations),
        tile_ms_all=durations,
        # Lane time of the map outside tiles, per tile, assuming the deployment ran
        # min(concurrency, items) lanes (4 tiles per item, the default): an estimate.
        orchestration_ms_per_tile=(
            timings.get("process", 0.0)
            * 1000
            * min(int(case["concurrency"]), max(1, -(-len(durations) // 4)))
            - sum(durations)
        )
        / max(len(durations), 1),
        note="concurrency is the deployment's MaxConcurrency unless the API takes it; "
        "tile encoding and tiles per item are the deployment's settings",
        tile_ms_median=statistics.median(durations) if durations else None,
    )
    return result

"""Peak memory per stage: every Lambda invocation of a job in its own process, as on Lambda.

The embedded engine runs in server mode (moto behind HTTP on loopback), and each of the
template's functions is replaced by a stand-in that runs the real handler module in a fresh
child process (``benchmarks.stage_child``) against that server. So the splitter, each tile
batch and the merger are measured alone: what they hold, not what moto holds for them. Each
child reports its resident memory after importing the handler (its baseline) and at its peak;
see ``benchmarks.memwatch`` for what the figures count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks._child import ROOT, run_child, write_result
from benchmarks.embedded import CHECKSUM_ENV

__all__ = ["run_stage_memory"]

_STAGE = {
    "SplitterFunction": "split",
    "TileWorkerFunction": "tile_batch",
    "MergerFunction": "merge",
}


def run_stage_memory(
    case: Mapping[str, Any],
    source: Path,
    *,
    timeout: float | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``case`` with one process per invocation; peak memory of each stage.

    ``extra_env`` reaches every stage process: for experiments such as ``MALLOC_ARENA_MAX`` or
    ``TILEFAN_BENCH_VIPS_CACHE_MAX`` (libvips' operation cache size, set before the handler).
    """
    env = {
        "TILEFAN_TILE_ENCODING": str(case["encoding"]),
        "TILEFAN_TILES_PER_ITEM": str(case["tiles_per_item"]),
        **CHECKSUM_ENV,
        **(extra_env or {}),
    }
    return run_child(
        "benchmarks.stage_memory",
        ["--case", json.dumps(dict(case)), "--source", str(source)],
        env=env,
        timeout=timeout,
    )


class _ChildHandler:
    """Stands in for one function: runs its handler in a child process per invocation."""

    def __init__(self, logical_id: str, records: list[dict[str, Any]], lock: threading.Lock):
        self.logical_id = logical_id
        self.records = records
        self.lock = lock

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="tilefan-stage-") as scratch:
            result_file = Path(scratch) / "result.json"
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.stage_child",
                    self.logical_id,
                    "--result",
                    str(result_file),
                ],
                input=json.dumps(event),
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                check=False,
            )
            if not result_file.exists():
                raise RuntimeError(f"{self.logical_id} child failed: {completed.stderr[-2000:]}")
            report = json.loads(result_file.read_text())
        report["stage"] = _STAGE.get(self.logical_id, self.logical_id)
        if event.get("action") == "abort":
            report["stage"] = "abort"
        if "item" in event:
            report["tiles"] = len(event["item"].get("tiles", []))
        with self.lock:
            self.records.append({k: v for k, v in report.items() if k != "response"})
        if "error" in report:
            raise RuntimeError(f"{self.logical_id}: {report['error']}")
        return report["response"]


def _summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for stage in ("split", "tile_batch", "merge"):
        rows = [row for row in records if row.get("stage") == stage]
        if not rows:
            continue

        def peak(field: str, rows: list[dict[str, Any]] = rows) -> float:
            return max(float(row["memory"][field]) for row in rows)

        stages[stage] = {
            "invocations": len(rows),
            "peak_rss_mb": peak("peak_rss_mb"),
            "peak_anon_mb": peak("peak_anon_mb"),
            "peak_file_mb": peak("peak_file_mb"),
            "peak_anon_over_baseline_mb": peak("peak_anon_over_baseline_mb"),
            "baseline_rss_mb": min(float(row["memory"]["baseline_rss_mb"]) for row in rows),
            "init_s_median": sorted(row["init_s"] for row in rows)[len(rows) // 2],
        }
    return stages


def _run(case: Mapping[str, Any], source: Path) -> dict[str, Any]:
    from benchmarks.chains import CHAINS
    from tilefan.jobs import TERMINAL, JobStatus
    from tilefan.local import LOCAL_OWNER, local_stack
    from tilefan.storage import keys

    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    handlers = {name: _ChildHandler(name, records, lock) for name in _STAGE}
    started = time.monotonic()
    with local_stack(server=True, handlers=handlers) as stack:
        service = stack.service
        job = service.create(
            LOCAL_OWNER,
            CHAINS[case["chain"]],
            "tiff",
            tile_size=int(case["tile_size"]),
            input_info={"size_bytes": source.stat().st_size},
        )
        service.store.upload(source, keys.upload(job.job_id), "application/octet-stream")
        service.start(LOCAL_OWNER, job.job_id, max_concurrency=int(case["concurrency"]))
        while True:
            current = service.jobs.get(job.job_id)
            if current.status in TERMINAL:
                break
            time.sleep(0.5)
        if current.execution_arn:
            # The merger marks the job SUCCEEDED before its process exits: wait for the
            # execution, so that the merger's own report is in.
            stack.engine.wait(current.execution_arn, timeout=600)
    if current.status is not JobStatus.SUCCEEDED:
        raise RuntimeError(f"job ended {current.status.value}: {current.error}")
    return {
        "status": current.status.value,
        "wall_s": time.monotonic() - started,
        "stages": _summarise(records),
        "invocations": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", required=True)
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    write_result(args.result, _run(json.loads(args.case), args.source))


if __name__ == "__main__":
    main()

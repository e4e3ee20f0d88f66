"""Peak memory per stage: every Lambda invocation of a job in its own process, as on Lambda.

The embedded engine runs in server mode (moto behind HTTP on loopback), and each of the
template's functions is replaced by a stand-in that runs the real handler module in a fresh
child process (``benchmarks.stage_child``) against that server. So the splitter, each tile
batch and the merger are measured alone: what they hold, not what moto holds for them. Each
child reports its resident memory after importing the handler (its baseline) and at its peak;
see ``benchmarks.memwatch`` for what the figures count.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks._child import run_child
from benchmarks.embedded import CHECKSUM_ENV, case_main, create_job, run_case

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
    return run_case(
        "benchmarks.stage_memory",
        case,
        source,
        env={**CHECKSUM_ENV, **(extra_env or {})},
        timeout=timeout,
    )


class _ChildHandler:
    """Stands in for one function: runs its handler in a child process per invocation."""

    def __init__(self, logical_id: str, records: list[dict[str, Any]], lock: threading.Lock):
        self.logical_id = logical_id
        self.records = records
        self.lock = lock

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        report = run_child("benchmarks.stage_child", [self.logical_id], stdin=json.dumps(event))
        if "memory" not in report:  # the child ended before its report: run_child's error
            raise RuntimeError(f"{self.logical_id} child failed: {report['error']}")
        report["stage"] = _STAGE.get(self.logical_id, self.logical_id)
        if event.get("action") in ("abort", "cleanup"):
            report["stage"] = event["action"]
        item = event.get("item", {})
        if "reduce" in item:  # the second fan-out's tasks, on the tile workers
            report["stage"] = "reduce"
        elif "batches" in item:
            report["stage"] = "compact"
        elif "tiles" in item:
            report["tiles"] = len(item["tiles"])
        with self.lock:
            self.records.append({k: v for k, v in report.items() if k != "response"})
        if "error" in report:
            raise RuntimeError(f"{self.logical_id}: {report['error']}")
        return report["response"]


def _summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for stage in ("split", "tile_batch", "compact", "reduce", "merge"):
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
    from tilefan.local.stack import LOCAL_OWNER, local_stack
    from tilefan.state.jobs import TERMINAL, JobStatus
    from tilefan.state.storage import keys

    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    handlers = {name: _ChildHandler(name, records, lock) for name in _STAGE}
    started = time.monotonic()
    with local_stack(server=True, handlers=handlers) as stack:
        service = stack.service
        job = create_job(service, case, source)
        service.store.upload(source, keys.upload(job.job_id), "application/octet-stream")
        service.start(LOCAL_OWNER, job.job_id, max_concurrency=int(case["concurrency"]))
        while True:
            current = service.jobs.get(job.job_id)
            if current.status in TERMINAL:
                break
            time.sleep(0.5)
        # The merger marks the job SUCCEEDED before its process exits: wait for the
        # execution, so that the merger's own report is in.
        stack.settle(job.job_id, timeout=600)
    if current.status is not JobStatus.SUCCEEDED:
        raise RuntimeError(f"job ended {current.status.value}: {current.error}")
    return {
        "status": current.status.value,
        "wall_s": time.monotonic() - started,
        "stages": _summarise(records),
        "invocations": records,
    }


def main() -> None:
    case_main(_run, __doc__)


if __name__ == "__main__":
    main()

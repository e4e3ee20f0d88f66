"""`tilefan demo`'s job with the functions in processes of their own, paired against threads.

Each run starts a fresh engine in a child process (as `tilefan demo` does), makes the demo's
synthetic JPEG and runs the demo chain to a TIFF at the demo's concurrency, alternating the
two modes. Reported: the whole run (engine start included, as a user waits for it) and the job
alone, per mode, and the ratio processes / threads. Run:
``.venv/bin/python -m benchmarks.engine_processes --megapixels 16 --repeats 2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("threads", "processes")


def _one(mode: str, megapixels: float, work: Path) -> dict[str, float]:
    from tilefan.cli import DEFAULT_CONCURRENCY, DEMO_CHAIN
    from tilefan.imaging.synthetic import synthetic_image
    from tilefan.local.stack import local_stack, run_job

    side = int((megapixels * 1_000_000) ** 0.5)
    source = work / "demo-input.jpg"
    synthetic_image(side, side).jpegsave(str(source), Q=90)
    processes = mode == "processes"
    warm = {"SplitterFunction": 1, "TileWorkerFunction": DEFAULT_CONCURRENCY, "MergerFunction": 1}
    started = time.monotonic()
    with local_stack(
        processes=processes, warm=warm if processes else None, function_logs=False
    ) as stack:
        ready = time.monotonic()
        view = run_job(
            stack,
            source,
            work / "demo-output.tif",
            DEMO_CHAIN,
            output_format="tiff",
            concurrency=DEFAULT_CONCURRENCY,
        )
        done = time.monotonic()
    if view.job.status.value != "SUCCEEDED":
        raise RuntimeError(f"{mode}: the job ended {view.job.status.value}: {view.job.error}")
    return {"whole": time.monotonic() - started, "job": done - ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megapixels", type=float, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(prefix="tilefan-bench-") as work:
            print(json.dumps(_one(args.child, args.megapixels, Path(work))))
        return
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            command = [sys.executable, "-m", "benchmarks.engine_processes"]
            command += ["--megapixels", str(args.megapixels), "--child", mode]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(output.strip().splitlines()[-1]))
    print(f"demo chain, {args.megapixels:g} MP, median of {args.repeats}:")
    medians = {
        mode: {part: statistics.median(run[part] for run in runs) for part in ("whole", "job")}
        for mode, runs in results.items()
    }
    for mode, median in medians.items():
        print(f"  {mode:9s} whole run {median['whole']:6.1f} s   job {median['job']:6.1f} s")
    for part in ("whole", "job"):
        ratio = medians["processes"][part] / medians["threads"][part]
        print(f"  processes / threads ({part}): {ratio:.2f}")


if __name__ == "__main__":
    main()

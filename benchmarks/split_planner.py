"""The splitter alone, old against new: wall time, peak memory and scratch disk, once each.

The embedded engine runs in server mode (moto behind HTTP on loopback) for the bucket and the
table; each split runs in its own child process against it, as one Lambda invocation would, so
its memory is its own. ``--baseline`` names a checkout of the previous splitter (the one that
downloaded, decoded to scratch and uploaded source tiles); the same job is split by both.

    python -m benchmarks.split_planner --tiled 64,256 --jpeg 16,64 --baseline /path/to/old

``/tmp`` use is the largest the child's scratch folder got, which is also its ``TMPDIR`` (where
libvips would put a temporary file). Each image is made in ``--images`` (a temporary folder by
default) just before its splits and deleted after them, so a 2 GP case needs one image on disk.
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
from pathlib import Path
from typing import Any

from tilefan.local.template import load_template

ROOT = Path(__file__).resolve().parents[1]

# Peak resident memory from VmHWM: ru_maxrss would carry the parent's (moto's) over the exec.
_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import pyvips
from tilefan.stages.pipeline import Pipeline
pyvips.cache_set_max(0)  # as splitter/app.py does at its cold start
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
pipeline = Pipeline.from_settings()
baseline = hwm()
started = time.monotonic()
answer = pipeline.split(sys.argv[2])
wall = time.monotonic() - started
peak = hwm()
job = pipeline.jobs.get(sys.argv[2])
print(json.dumps({"wall_s": wall, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
                  "tiles": answer["tile_count"], "grid": job.grid}))
"""


def make_image(kind: str, megapixels: int, folder: Path) -> Path:
    """A square test image: a tiled deflate TIFF or a JPEG, of a cheap but not flat pattern."""
    import pyvips

    side = int((megapixels * 1e6) ** 0.5)
    xyz = pyvips.Image.xyz(side, side)
    pattern = ((xyz[0] * 3 + xyz[1] * 7) % 251).cast("uchar")
    rgb = pattern.bandjoin([(xyz[0] % 253).cast("uchar"), (xyz[1] % 241).cast("uchar")])
    path = folder / f"{kind}-{megapixels}mp.{'tif' if kind == 'tiled' else 'jpg'}"
    if kind == "tiled":
        rgb.tiffsave(str(path), tile=True, tile_width=256, tile_height=256, compression="deflate")
    else:
        rgb.jpegsave(str(path), Q=90)
    return path


def scratch_peak(folder: Path, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        peak[0] = max(peak[0], size)
        time.sleep(0.1)


def splitter_malloc() -> dict[str, str]:
    """glibc's ``MALLOC_*`` settings, as the template gives them to the splitter."""
    environment = load_template(ROOT).functions["SplitterFunction"].environment
    return {name: str(value) for name, value in environment.items() if name.startswith("MALLOC_")}


def _split(tree: Path, job_id: str, env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="split-scratch-") as scratch:
        stop, peak = threading.Event(), [0]
        watcher = threading.Thread(target=scratch_peak, args=(Path(scratch), stop, peak))
        watcher.start()
        try:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, str(tree), job_id],
                env={**env, "TMPDIR": scratch, **splitter_malloc()},
                capture_output=True,
                text=True,
                check=True,
            )
        finally:
            stop.set()
            watcher.join()
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    report["scratch_peak_mb"] = peak[0] / 2**20
    return report


def run(
    tiled: list[int],
    jpeg: list[int],
    baseline: Path | None,
    *,
    images: Path | None = None,
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """Split each image with this checkout's splitter, and with ``baseline``'s if given.

    Each row is printed, and appended to ``out`` if given, as one JSON line.
    """
    from benchmarks.machine import load_average
    from tilefan.local.stack import LOCAL_OWNER, local_stack
    from tilefan.state.jobs import JobStatus
    from tilefan.state.storage import keys

    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="split-images-", dir=images) as folder,
        local_stack(server=True) as stack,
    ):
        service = stack.service
        env = {
            **os.environ,
            "TILEFAN_BUCKET": service.store.bucket,
            "TILEFAN_TABLE": service.jobs.table.name,
            "AWS_ENDPOINT_URL": str(stack.engine.endpoint_url),
        }
        cases = [("tiled", mp) for mp in tiled] + [("jpeg", mp) for mp in jpeg]
        for kind, megapixels in cases:
            made = time.monotonic()
            path = make_image(kind, megapixels, Path(folder))
            made_s = time.monotonic() - made
            trees = [("new", ROOT)] + ([("old", baseline)] if baseline else [])
            for variant, tree in trees:
                job = service.create(
                    LOCAL_OWNER,
                    [{"op": "gaussblur", "sigma": 2}],
                    "tiff",
                    tile_size=1024,
                    input_info={"size_bytes": path.stat().st_size},
                )
                service.store.upload(path, keys.upload(job.job_id), "application/octet-stream")
                service.jobs.transition(
                    job.job_id, JobStatus.QUEUED, allowed_from={JobStatus.CREATED}
                )
                load_before = load_average()
                report = _split(tree, job.job_id, env)
                grid = report.pop("grid")
                rows.append(
                    {
                        "input": kind,
                        "megapixels": megapixels,
                        "upload_mb": path.stat().st_size / 2**20,
                        "splitter": variant,
                        **report,
                        "bytes_read": grid.get("bytes_read"),
                        "bytes_written_mb": grid["bytes_split"] / 2**20,
                        "image_made_s": made_s,
                        "load_before": load_before,
                        "load_after": load_average(),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                if out is not None:
                    with out.open("a", encoding="utf-8") as lines:
                        lines.write(json.dumps(rows[-1]) + "\n")
                service.store.delete_prefix(keys.job_prefix(job.job_id))
                service.store.delete_prefix(f"uploads/{job.job_id}/")
            path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiled", default="64,256", help="tiled TIFF sizes, MP")
    parser.add_argument("--jpeg", default="16,64", help="JPEG sizes, MP")
    parser.add_argument("--baseline", type=Path, help="a checkout of the previous splitter")
    parser.add_argument("--images", type=Path, help="where the inputs are made (default: /tmp)")
    parser.add_argument("--out", type=Path, help="append each row to this JSON-lines file")
    args = parser.parse_args()
    sizes = [[int(v) for v in value.split(",") if v] for value in (args.tiled, args.jpeg)]
    run(sizes[0], sizes[1], args.baseline, images=args.images, out=args.out)


if __name__ == "__main__":
    main()

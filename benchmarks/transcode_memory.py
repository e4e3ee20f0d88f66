"""The splitter's transcode alone at any size: time, peak memory and /tmp, against a stub S3.

The embedded engine cannot take a 2 GP transcode: moto keeps every multipart part in memory and
joins them on completion (about 15 GB held at 2 GP before it was stopped). So this runs the
splitter's own path (`open_object` reading the upload by ranged GETs, `transcode` writing the
tiled intermediate by multipart upload) in a child process, as the splitter Lambda is set up
(libvips' cache off, glibc's ``MALLOC_*`` settings from the template),
against an S3 client that serves the upload from a local file by range and drops the parts it
is sent. What the child holds is then what the
splitter holds; S3's side is not measured.

    python -m benchmarks.transcode_memory --jpeg 100,2000 --paired 100 --out rows.jsonl

``--paired`` sizes are transcoded twice from the same image: as built, then with libvips'
default buffers (``thin_strips`` made a no-op), the pair giving the memory saved and the
time ratio in one run.
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

from benchmarks._child import emit_row
from benchmarks.machine import load_average
from benchmarks.split_planner import ROOT, make_image, scratch_peak, splitter_malloc

__all__ = ["run"]

_CHILD = """
import io, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import pyvips
pyvips.cache_set_max(0)  # as splitter/app.py does at its cold start
if sys.argv[3] == "libvips-default":
    import tilefan.formats.strips
    tilefan.formats.strips._parse_vips_options = lambda *options: None
from tilefan.formats.tiled import open_object, transcode, transcode_tile_edge
from tilefan.state.storage import TileStore

class LocalUpload:
    # Ranged GETs of one local file; multipart calls accepted and their bodies dropped.
    def __init__(self, path):
        self.path = path
        self.parts = 0
    def head_object(self, **_):
        import os
        return {"ContentLength": os.path.getsize(self.path)}
    def get_object(self, Range, **_):
        start, end = (int(v) for v in Range.split("=")[1].split("-"))
        with open(self.path, "rb") as stream:
            stream.seek(start)
            return {"Body": io.BytesIO(stream.read(end - start + 1))}
    def create_multipart_upload(self, **_):
        return {"UploadId": "local"}
    def upload_part(self, Body, **_):
        self.parts += 1
        return {"ETag": str(self.parts)}
    def complete_multipart_upload(self, **_):
        return {}
    def abort_multipart_upload(self, **_):
        return {}

def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024

client = LocalUpload(sys.argv[2])
store = TileStore("local", client=client)
baseline = hwm()
started, cpu = time.monotonic(), time.process_time()
header, origin = open_object(store, "upload", name="upload", access="sequential")
size = transcode(header, origin, store, "source.tif", transcode_tile_edge(1024))
print(json.dumps({
    "buffers": sys.argv[3],
    "wall_s": time.monotonic() - started,
    "cpu_s": time.process_time() - cpu,
    "baseline_rss_mb": baseline,
    "peak_rss_mb": hwm(),
    "transcode_mb": size / 2**20,
    "parts": client.parts,
    "megapixels": header.width * header.height / 1e6,
}))
"""


def run(
    sizes: list[int],
    *,
    images: Path | None = None,
    out: Path | None = None,
    made: dict[int, Path] | None = None,
    paired: frozenset[int] = frozenset(),
) -> list[dict[str, Any]]:
    """Transcode a JPEG of each size (MP) once; rows printed and appended to ``out``.

    ``made`` maps a size to an image of it made before (`make_image`'s), used as it is;
    ``paired`` sizes are transcoded again with libvips' default buffers.
    """
    rows = []
    for megapixels in sizes:
        with (
            tempfile.TemporaryDirectory(prefix="transcode-images-", dir=images) as folder,
            tempfile.TemporaryDirectory(prefix="transcode-scratch-") as scratch,
        ):
            path = (made or {}).get(megapixels) or make_image("jpeg", megapixels, Path(folder))
            for buffers in ("thin", "libvips-default")[: 2 if megapixels in paired else 1]:
                row = _transcode(path, Path(scratch), buffers)
                rows.append(row)
                emit_row(row, out)
    return rows


def _transcode(path: Path, scratch: Path, buffers: str) -> dict[str, Any]:
    """One transcode of ``path`` in its own process, ``TMPDIR`` in ``scratch`` (watched)."""
    stop, peak = threading.Event(), [0]
    watcher = threading.Thread(target=scratch_peak, args=(scratch, stop, peak))
    watcher.start()
    load_before = load_average()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(ROOT), str(path), buffers],
            env={
                **os.environ,
                "TMPDIR": str(scratch),
                **splitter_malloc(),
                "AWS_LAMBDA_FUNCTION_NAME": "Splitter",  # as the splitter's environment
            },
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        stop.set()
        watcher.join()
    return {
        "input": "jpeg",
        "upload_mb": path.stat().st_size / 2**20,
        **json.loads(done.stdout.strip().splitlines()[-1]),
        "scratch_peak_mb": peak[0] / 2**20,
        "load_before": load_before,
        "load_after": load_average(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jpeg", default="100,2000", help="JPEG sizes, MP")
    parser.add_argument(
        "--paired", default="", help="sizes (MP) also run with libvips' default buffers"
    )
    parser.add_argument("--images", type=Path, help="where the inputs are made (default: /tmp)")
    parser.add_argument("--out", type=Path, help="append each row to this JSON-lines file")
    parser.add_argument(
        "--made", action="append", default=[], help="MP=PATH: an image of that size made before"
    )
    args = parser.parse_args()
    made = {int(size): Path(path) for size, path in (item.split("=", 1) for item in args.made)}
    sizes = [int(value) for value in args.jpeg.split(",") if value]
    paired = frozenset(int(value) for value in args.paired.split(",") if value)
    run(sizes, images=args.images, out=args.out, made=made, paired=paired)


if __name__ == "__main__":
    main()

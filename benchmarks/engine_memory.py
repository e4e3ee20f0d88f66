"""The embedded engine process's peak memory at two image sizes, objects on disk or in memory.

Each run is ``tilefan run`` (invert, 1024 px tiles, a deflate TIFF) in its own process, whose
peak resident and anonymous memory are read from ``/proc`` while it runs. The engine's setting
(objects above 64 KiB in temporary files) is paired with moto's default (objects under about
5 MB in memory) on the same images in the same run.
Run: ``.venv/bin/python -m benchmarks.engine_memory [MP ...] [--engine-only]`` (default 16 and
64 MP; ``--engine-only`` skips moto's default, which cannot hold a gigapixel job).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES_MP = (16, 64)
VARIANTS = {"engine (64 KiB in memory)": "65536", "moto default (5 MB in memory)": "5241856"}


def make_image(megapixels: int, path: Path) -> None:
    """An RGB noise image, a 4096 px block of noise repeated (as costly to compress as noise,
    but quick to make at gigapixels), saved as an uncompressed tiled BigTIFF (a 2 GP image is
    6 GB, past a classic TIFF's 4 GB)."""
    side = int((megapixels * 1_000_000) ** 0.5)
    block = min(side, 4096)
    script = (
        "import pyvips, sys; "
        f"im = pyvips.Image.gaussnoise({block}, {block}, mean=128, sigma=40).cast('uchar'); "
        f"im = im.bandjoin([im.rot180(), im.fliphor()]).copy_memory(); "
        f"n = -(-{side} // {block}); "
        f"im.replicate(n, n).crop(0, 0, {side}, {side})"
        ".tiffsave(sys.argv[1], tile=True, bigtiff=True)"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)


def peak_mb(source: Path, output: Path, buffer_bytes: str) -> tuple[float, float, float]:
    """Peak resident and peak anonymous MB, and wall seconds, of one `tilefan run`.

    The kernel's high-water mark (``VmHWM``) counts file-backed pages too (libvips maps its
    scratch files), so anonymous memory (heap and pixel buffers) is sampled beside it.
    """
    command = [sys.executable, "-m", "tilefan.cli", "run", str(source), "-o", str(output)]
    command += ["--op", "invert", "--tile-size", "1024", "--concurrency", "4"]
    env = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": buffer_bytes}
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    status = Path(f"/proc/{child.pid}/status")
    peak = {"VmHWM": 0, "RssAnon": 0}
    while child.poll() is None:
        try:
            for line in status.read_text().splitlines():
                name, _, value = line.partition(":")
                if name in peak:
                    peak[name] = max(peak[name], int(value.split()[0]))
        except OSError:  # the child has just exited
            pass
        time.sleep(0.02)
    if child.returncode:
        raise RuntimeError(f"tilefan run failed with {child.returncode}")
    return peak["VmHWM"] / 1024, peak["RssAnon"] / 1024, time.perf_counter() - started


def main(sizes: list[int], variants: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="tilefan-engine-memory-") as folder:
        print(
            "| image (MP) | variant | peak RSS, VmHWM (MB) | peak anonymous (MB) | wall (s) "
            "| load |"
        )
        print("| ---: | --- | ---: | ---: | ---: | ---: |")
        for megapixels in sizes:
            source = Path(folder) / f"in-{megapixels}.tif"
            make_image(megapixels, source)
            for name, buffer_bytes in variants.items():
                peak, anonymous, wall = peak_mb(source, Path(folder) / "out.tif", buffer_bytes)
                load = os.getloadavg()[0]
                print(
                    f"| {megapixels} | {name} | {peak:.0f} | {anonymous:.0f} | {wall:.1f} "
                    f"| {load:.1f} |",
                    flush=True,
                )
            source.unlink()


if __name__ == "__main__":
    engine_only = "--engine-only" in sys.argv[1:]
    chosen = dict(list(VARIANTS.items())[:1]) if engine_only else VARIANTS
    sizes = [int(arg) for arg in sys.argv[1:] if arg != "--engine-only"] or list(SIZES_MP)
    main(sizes, chosen)

"""The peers, each run in its own process: whole-image libvips, and dask-image.

Both read the same JPEG and write a tiled, deflate-compressed TIFF with the same libvips encoder
and settings as the tilefan merger, so every ratio compares the same job end to end. Run as
``python -m benchmarks.baselines {libvips,dask} --source ... --chain ... --result ...``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._child import run_child, write_result
from benchmarks.memwatch import watch

__all__ = ["run_baseline"]


def run_baseline(
    kind: str, source: Path, chain: str, *, chunk: int = 1024, timeout: float | None = None
) -> dict[str, Any]:
    """Run one peer on ``source`` in a child process; its timings and peak memory."""
    return run_child(
        "benchmarks.baselines",
        [kind, "--source", str(source), "--chain", chain, "--chunk", str(chunk)],
        timeout=timeout,
    )


def _libvips(source: Path, chain_name: str, scratch: Path) -> dict[str, Any]:
    from functools import reduce

    import pyvips

    from benchmarks.chains import CHAINS
    from tilefan.formats.source import upright
    from tilefan.imaging.operations import OpKind, parse_chain

    chain = parse_chain(CHAINS[chain_name])
    # Sequential access streams the JPEG top to bottom; steps that move pixels need random
    # access, which makes libvips decode the whole image first (to memory, or to a temporary
    # file above 100 MB), as it would for any user running this chain.
    geometric = any(step.kind is OpKind.GEOMETRIC for step in chain)
    access = "random" if geometric else "sequential"
    result: dict[str, Any] = {"access": access}
    started, cpu = time.monotonic(), time.process_time()
    with watch(result):
        image = upright(pyvips.Image.new_from_file(str(source), access=access))
        output = reduce(lambda im, step: step.apply(im), chain, image)
        saved = _save_tiff(output, scratch)
    result.update(
        wall_s=time.monotonic() - started,
        cpu_s=time.process_time() - cpu,
        output_bytes=saved.stat().st_size,
        output_pixels=output.width * output.height,
    )
    return result


def _save_tiff(image: Any, scratch: Path) -> Path:
    """libvips' whole-image save of a tilefan TIFF result: 256 px tiles, deflate."""
    path = scratch / "result.tif"
    image.tiffsave(str(path), tile=True, tile_width=256, tile_height=256, compression="deflate")
    return path


def _dask(source: Path, chain_name: str, scratch: Path, chunk: int) -> dict[str, Any]:
    import dask
    import dask.array as da
    import numpy as np
    import pyvips
    from PIL import Image

    from benchmarks.chains import dask_chain

    Image.MAX_IMAGE_PIXELS = None  # the benchmark's own images, not untrusted uploads
    workers = os.cpu_count() or 1
    result: dict[str, Any] = {"chunk": chunk, "workers": workers, "scheduler": "threads"}
    started, cpu = time.monotonic(), time.process_time()
    with watch(result):
        with Image.open(source) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        decoded = time.monotonic()
        array = da.from_array(pixels, chunks=(chunk, chunk, -1))  # type: ignore[no-untyped-call]
        with dask.config.set(scheduler="threads", num_workers=workers):
            output = dask_chain(chain_name, array).compute()
        computed = time.monotonic()
        # The same encoder and settings as the libvips peer (and the tilefan workers' tiles),
        # so the ratios compare how the pixels are computed, not two TIFF writers.
        image = pyvips.Image.new_from_array(output).copy(interpretation="srgb")
        path = _save_tiff(image, scratch)
    finished = time.monotonic()
    result.update(
        wall_s=finished - started,
        cpu_s=time.process_time() - cpu,
        decode_s=decoded - started,
        compute_s=computed - decoded,
        save_s=finished - computed,
        output_bytes=path.stat().st_size,
        output_pixels=int(output.shape[0] * output.shape[1]),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["libvips", "dask"])
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--chain", required=True)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tilefan-baseline-") as scratch:
        if args.kind == "libvips":
            result = _libvips(args.source, args.chain, Path(scratch))
        else:
            result = _dask(args.source, args.chain, Path(scratch), args.chunk)
    result["kind"] = args.kind
    write_result(args.result, result)


if __name__ == "__main__":
    main()

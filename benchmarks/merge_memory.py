"""The merger of a TIFF result at two image sizes: its peak memory and time, one process each.

Each size is one job (the point chain on a noise image, so each batch's deflated tiles pass
S3's 5 MiB copy minimum as a real image's do; made here and deleted after) run by
``benchmarks.stage_memory``: the engine in server mode, every invocation in its own process.
The merger's row gives its peak memory, its handler's wall and CPU time and the batches (index
objects) it read; the per-tile metadata it holds grows with the batch count. The wall time
includes the engine's server-side copies (on AWS, S3's work), which grow with the bytes; the
CPU time is the merger's own.

    python -m benchmarks.merge_memory --sizes 100,2000 --tile 4096 --out rows.jsonl
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._child import emit_row
from benchmarks.engine_memory import make_image
from benchmarks.machine import load_average
from benchmarks.stage_memory import run_stage_memory

__all__ = ["run"]


def run(
    sizes: list[int],
    tile_size: int,
    *,
    pyramid: bool = False,
    images: Path | None = None,
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """One job per size in ``sizes`` (MP), a COG with ``pyramid``; the merger's figures,
    printed and appended to ``out``."""
    rows = []
    for megapixels in sizes:
        with tempfile.TemporaryDirectory(prefix="merge-images-", dir=images) as folder:
            source = Path(folder) / f"noise-{megapixels}mp.tif"
            make_image(megapixels, source)
            case = {
                "chain": "point",
                "tile_size": tile_size,
                "concurrency": 2,
                "encoding": "none",
                "tiles_per_item": 4,
                "output_options": {"pyramid": pyramid},
            }
            load_before = load_average()
            result = run_stage_memory(case, source, timeout=3600)
        merges = [row for row in result.get("invocations", []) if row.get("stage") == "merge"]
        row = {
            "megapixels": megapixels,
            "tile_size": tile_size,
            "pyramid": pyramid,
            "status": result.get("status", result.get("error")),
            "job_wall_s": result.get("wall_s"),
            "merge": result.get("stages", {}).get("merge"),
            # The workers' too: each halves its block for the levels it writes.
            "tile_batch": result.get("stages", {}).get("tile_batch"),
            "merge_handler_s": [merge["handler_s"] for merge in merges],
            "merge_handler_cpu_s": [merge.get("handler_cpu_s") for merge in merges],
            "batches": sum(1 for row in result.get("invocations", []) if "tiles" in row),
            "compaction_groups": sum(
                1 for row in result.get("invocations", []) if row.get("stage") == "compact"
            ),
            # The first coarse level's groups, reduced by the second fan-out, and their peak.
            "reduce_groups": sum(
                1 for row in result.get("invocations", []) if row.get("stage") == "reduce"
            ),
            "reduce": result.get("stages", {}).get("reduce"),
            "load_before": load_before,
            "load_after": load_average(),
        }
        rows.append(row)
        emit_row(row, out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,2000", help="image sizes, MP")
    parser.add_argument("--tile", type=int, default=4096, help="tile size, px")
    parser.add_argument("--pyramid", action="store_true", help="a COG result")
    parser.add_argument("--images", type=Path, help="where the inputs are made (default: /tmp)")
    parser.add_argument("--out", type=Path, help="append each row to this JSON-lines file")
    args = parser.parse_args()
    sizes = [int(value) for value in args.sizes.split(",") if value]
    run(sizes, args.tile, pyramid=args.pyramid, images=args.images, out=args.out)


if __name__ == "__main__":
    main()

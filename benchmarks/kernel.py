"""CPU cost of the work itself, on one thread: what the Lambda model scales from.

With ``VIPS_CONCURRENCY=1`` and no storage in the way, this measures for each tile size and tile
encoding the CPU seconds a tile worker spends on one interior tile (decode its source tile, run
the chain, encode the result's TIFF tiles as the worker does) and the bytes it reads and
writes; and the CPU rates of the serial stages' own work: transcoding the JPEG into the tiled
intermediate (the splitter's writer, which compresses in threads beside the decode) and
encoding the output TIFF (merger).
Run as ``python -m benchmarks.kernel`` in a child process, because libvips reads its
concurrency once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._child import run_child, write_result

__all__ = ["run_kernel"]


def run_kernel(
    source: Path,
    chain: str,
    tile_sizes: Sequence[int],
    encodings: Sequence[str],
    *,
    samples: int = 3,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Measure per-tile CPU and bytes for each tile size and encoding, in a child process."""
    return run_child(
        "benchmarks.kernel",
        [
            "--source",
            str(source),
            "--chain",
            chain,
            "--tile-sizes",
            ",".join(map(str, tile_sizes)),
            "--encodings",
            ",".join(encodings),
            "--samples",
            str(samples),
        ],
        env={"VIPS_CONCURRENCY": "1"},
        timeout=timeout,
    )


def _cpu_and_wall(action: Any) -> tuple[Any, float, float]:
    cpu, wall = time.process_time(), time.monotonic()
    value = action()
    return value, time.process_time() - cpu, time.monotonic() - wall


def _measure(
    source_path: Path, chain_name: str, tile_sizes: list[int], encodings: list[str], samples: int
) -> dict[str, Any]:
    import pyvips

    from benchmarks.chains import CHAINS
    from tilefan.formats.source import open_checked, upright
    from tilefan.formats.tiff_tiles import TiffEncoding, encode_block
    from tilefan.formats.tiled import deflate_transcode, transcode_tile_height
    from tilefan.imaging.execute import execute_tile
    from tilefan.imaging.operations import parse_chain
    from tilefan.imaging.plan import ImageSpec, plan_tiles

    pyvips.cache_set_max(0)  # every tile pays its own way, as in a fresh batch
    chain = parse_chain(CHAINS[chain_name])
    result: dict[str, Any] = {"chain": chain_name, "tiles": []}
    with tempfile.TemporaryDirectory(prefix="tilefan-kernel-") as scratch:
        header = open_checked(source_path, access="sequential")
        transcoded = Path(scratch) / "source.tif"
        with transcoded.open("wb") as out:
            # The splitter's own writer (an 8-bit JPEG), to a file instead of a multipart upload.
            _, cpu, wall = _cpu_and_wall(
                lambda: deflate_transcode(header, out, 256, transcode_tile_height(256, header))
            )
        source = upright(open_checked(transcoded))
        pixels = source.width * source.height
        # The splitter's transcode: decode, and write the tiled deflate intermediate.
        result["split_decode"] = {
            "megapixels": pixels / 1e6,
            "cpu_s": cpu,
            "wall_s": wall,
            "mp_per_cpu_s": pixels / 1e6 / cpu,
            "bytes_per_pixel": transcoded.stat().st_size / pixels,
        }
        spec = ImageSpec.of(source)
        for tile_size in tile_sizes:
            plan = plan_tiles(spec, chain, tile_size)
            middle = plan.rows // 2
            picks = [
                plan.tile(middle * plan.columns + column)
                for column in range(max(0, plan.columns // 2 - samples // 2), plan.columns)
            ][:samples]
            for encoding in encodings:
                rows = []
                for tile in picks:
                    block = source.crop(*tile.source)
                    body_in, cut_cpu, _ = _cpu_and_wall(
                        lambda block=block, encoding=encoding: block.tiffsave_buffer(
                            compression=encoding, predictor="none"
                        )
                    )

                    def work(
                        body_in: bytes = body_in,
                        tile: Any = tile,
                        plan: Any = plan,
                        encoding: str = encoding,
                    ) -> tuple[bytes, bytes]:
                        decoded = (
                            pyvips.Image.new_from_buffer(body_in, "", access="sequential")
                            .copy(interpretation=spec.interpretation)
                            .copy_memory()
                        )
                        out = execute_tile(chain, spec, decoded, tile.output)
                        # The worker's own encoder for a TIFF result in this compression.
                        encoded = encode_block(
                            out.copy(interpretation=plan.output_interpretation),
                            TiffEncoding(compression=encoding),
                            metadata=False,
                        )
                        return body_in, b"".join(encoded.tiles)

                    (_, body_out), cpu, wall = _cpu_and_wall(work)
                    rows.append(
                        {
                            "cpu_s": cpu,
                            "wall_s": wall,
                            "split_encode_cpu_s": cut_cpu,
                            "bytes_in": len(body_in),
                            "bytes_out": len(body_out),
                            "source_pixels": tile.source.w * tile.source.h,
                            "output_pixels": tile.output.w * tile.output.h,
                        }
                    )
                result["tiles"].append(
                    {
                        "tile_size": tile_size,
                        "encoding": encoding,
                        "samples": len(rows),
                        **{
                            field: statistics.median(row[field] for row in rows)
                            for field in rows[0]
                        },
                    }
                )
        # The merger's encoder, on a block of real chain output.
        side = min(4096, source.width, source.height)
        block = source.crop((source.width - side) // 2, (source.height - side) // 2, side, side)
        processed = block
        for step in chain:
            processed = step.apply(processed)
        processed = processed.copy_memory()
        out_pixels = processed.width * processed.height
        encoders = {}
        for compression in ("deflate", "lzw", "none"):
            # libvips' whole-image TIFF save with the result's tiles and this compression.
            path = Path(scratch) / f"encoded-{compression}.tif"
            _, cpu, wall = _cpu_and_wall(
                lambda compression=compression, path=path: processed.tiffsave(
                    str(path), tile=True, tile_width=256, tile_height=256, compression=compression
                )
            )
            encoders[compression] = {
                "mp_per_cpu_s": out_pixels / 1e6 / cpu,
                "bytes_per_pixel": path.stat().st_size / out_pixels,
                "cpu_s": cpu,
                "megapixels": out_pixels / 1e6,
            }
        result["merge_encode"] = encoders
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--chain", required=True)
    parser.add_argument("--tile-sizes", required=True)
    parser.add_argument("--encodings", default="none")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    result = _measure(
        args.source,
        args.chain,
        [int(size) for size in args.tile_sizes.split(",")],
        args.encodings.split(","),
        args.samples,
    )
    write_result(args.result, result)


if __name__ == "__main__":
    main()

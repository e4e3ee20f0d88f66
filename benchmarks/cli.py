"""``python -m benchmarks``: run a profile, write JSON, a Markdown summary and plots.

Every tilefan job is followed at once by its peers on the same image and chain (whole-image
libvips, dask-image), so each ratio compares runs made seconds apart on the same, shared
machine. See docs/benchmarks.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks._child import ROOT
from benchmarks.profiles import PROFILES, Profile
from tilefan.cli_failures import OneLineParser, UsageError, guarded

__all__ = ["main", "run_profile"]

RESULTS = ROOT / "benchmarks" / "results"
IMAGES = Path("/tmp/tilefan-bench-images")
MODEL_SIZES_GP = (0.1, 0.25, 0.5, 1, 2, 5, 10)
MODEL_CONCURRENCY = (10, 100, 1000)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m benchmarks", description=__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--quick",
        action="store_const",
        dest="profile",
        const="quick",
        help="trends on 16-64 MP images, about 10 minutes on 2 cores (the default)",
    )
    which.add_argument(
        "--full",
        action="store_const",
        dest="profile",
        const="full",
        help="100 MP to 1 GP, the targets' sizes; an hour or more",
    )
    which.add_argument("--profile", choices=sorted(PROFILES), help="a named profile")
    parser.add_argument("--sizes", help="comma-separated megapixels for the size sweep")
    parser.add_argument(
        "--only-sizes",
        action="store_true",
        help="skip the chain, tile size, concurrency and encoding sweeps",
    )
    parser.add_argument("--no-dask", action="store_true", help="skip the dask-image peer")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-stage memory runs")
    parser.add_argument(
        "--memory-only", action="store_true", help="only the per-stage memory runs (and the model)"
    )
    parser.add_argument("--no-kernel", action="store_true", help="skip the per-tile CPU runs")
    parser.add_argument(
        "--memory",
        help="MP:TILE pairs for the per-stage memory runs, "
        "comma-separated (default: the profile's)",
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default benchmarks/results/PROFILE)"
    )
    parser.add_argument(
        "--images", type=Path, default=IMAGES, help="where synthetic inputs are cached"
    )
    parser.add_argument(
        "--source",
        choices=["jpeg", "tiff"],
        default="jpeg",
        help="the synthetic input: a JPEG the splitter transcodes (the default), or a tiled "
        "TIFF the workers read by range",
    )
    parser.add_argument(
        "--s3-checksums",
        action="store_true",
        help="keep botocore's optional checksums in the embedded engine",
    )
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per child run")
    parser.add_argument("--api", help="run the jobs on this deployment (tilefan submit) instead")
    parser.add_argument("--key", help="the API key for --api")
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="rewrite summary.md and the plots beside an existing results.json",
    )
    return parser


def _profile(args: argparse.Namespace) -> Profile:
    profile = PROFILES[args.profile or "quick"]
    if args.sizes:
        sizes = tuple(float(size) for size in args.sizes.split(","))
        profile = replace(
            profile, sizes_mp=sizes, sweep_mp=min(sizes), name=f"{profile.name}-custom"
        )
    if args.only_sizes:
        profile = replace(profile, chains=(), tile_sizes=(), concurrencies=(), encodings=())
    if args.no_dask:
        profile = replace(profile, dask=False)
    if args.no_memory:
        profile = replace(profile, memory=())
    elif args.memory:
        pairs = tuple(
            (float(mp), int(tile))
            for mp, _, tile in (pair.partition(":") for pair in args.memory.split(","))
        )
        profile = replace(profile, memory=pairs)
    return profile


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Run everything the profile names; the whole result document."""
    from benchmarks.baselines import run_baseline
    from benchmarks.embedded import run_embedded
    from benchmarks.images import synthetic_source, synthetic_tiled_tiff
    from benchmarks.machine import describe_machine, load_average

    profile = _profile(args)
    document: dict[str, Any] = {
        "profile": profile.name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": describe_machine(),
        "settings": {
            "source": args.source,
            "s3_checksums": bool(args.s3_checksums),
            "deployed_api": args.api,
            "profile": asdict(profile),
        },
        "runs": [],
        "baselines": [],
        "memory": [],
    }
    sources: dict[float, Path] = {}

    def source_for(megapixels: float) -> Path:
        if megapixels not in sources:
            make = synthetic_tiled_tiff if args.source == "tiff" else synthetic_source
            path, seconds = make(megapixels, args.images)
            if seconds:
                _log(f"made {path.name} in {seconds:.1f}s")
            sources[megapixels] = path
        return sources[megapixels]

    done_baselines: set[tuple[float, str]] = set()
    cases = [] if args.memory_only else profile.cases()
    for number, case in enumerate(cases, 1):
        source = source_for(case.megapixels)
        _log(f"[{number}/{len(cases)}] tilefan {case.sweep}: {case.megapixels} MP {case.job()}")
        if args.api:
            from benchmarks.deployed import run_deployed

            run = run_deployed(case.job(), source, args.api, args.key)
        else:
            run = run_embedded(
                case.job(), source, s3_checksums=args.s3_checksums, timeout=args.timeout
            )
        run.update(
            case=asdict(case), source_bytes=source.stat().st_size, load_average=load_average()
        )
        _log(_one_line(run))
        document["runs"].append(run)
        pair = (case.megapixels, case.chain)
        if pair in done_baselines:
            continue
        done_baselines.add(pair)
        kinds = ["libvips", "dask"] if profile.dask else ["libvips"]
        for kind in kinds:
            baseline = run_baseline(
                kind, source, case.chain, chunk=case.tile_size, timeout=args.timeout
            )
            baseline.update(
                megapixels=case.megapixels, chain=case.chain, load_average=load_average()
            )
            _log(
                f"  {kind}: "
                + (
                    f"{baseline['wall_s']:.1f}s"
                    if "wall_s" in baseline
                    else baseline.get("error", "?")[:300]
                )
            )
            document["baselines"].append(baseline)

    if not args.api:
        from benchmarks.stage_memory import run_stage_memory

        for megapixels, tile_size in profile.memory:
            case = replace(profile.base, megapixels=megapixels, tile_size=tile_size, sweep="memory")
            _log(f"stage memory: {megapixels} MP, tile {tile_size}")
            probe = run_stage_memory(case.job(), source_for(megapixels), timeout=args.timeout)
            probe.update(case=asdict(case))
            _log("  " + json.dumps(probe.get("stages", probe.get("error", "")))[:400])
            document["memory"].append(probe)

    if args.no_kernel:
        document["kernel"] = {"error": "skipped (--no-kernel)"}
    else:
        from benchmarks.kernel import run_kernel

        kernel_mp = max(
            (size for size in profile.sizes_mp if size <= 500), default=profile.sweep_mp
        )
        _log(f"per-tile CPU on one thread, {kernel_mp} MP image")
        document["kernel"] = run_kernel(
            source_for(kernel_mp),
            profile.base.chain,
            profile.kernel_tile_sizes,
            ["none", "lzw", "deflate"],
            samples=profile.kernel_samples,
            timeout=args.timeout,
        )
        document["kernel"]["megapixels"] = kernel_mp
        document["kernel"]["source_bytes_per_px"] = source_for(kernel_mp).stat().st_size / (
            kernel_mp * 1e6
        )
    document["model"] = _model(document)
    document["pairs"] = _pairs(document)
    document["targets"] = _targets(document)
    document["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return document


def _one_line(run: dict[str, Any]) -> str:
    if "error" in run:
        return "  error: " + str(run["error"])[:500]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in run.get("timings", {}).items())
    return (
        f"  {run.get('end_to_end_s', 0):.1f}s end to end ({timings}); "
        f"{run.get('tile_count')} tiles, p50 {run.get('tile_ms', {}).get('p50')} ms; "
        f"orchestration {run.get('orchestration_ms_per_tile', 0):.1f} ms/tile"
    )


def _worker_peaks(document: dict[str, Any]) -> dict[int, float]:
    peaks: dict[int, float] = {}
    for probe in document["memory"]:
        worker = probe.get("stages", {}).get("tile_batch")
        if worker:
            tile = int(probe["case"]["tile_size"])
            peaks[tile] = max(peaks.get(tile, 0.0), float(worker["peak_rss_mb"]))
    return peaks


def _model(document: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.model import ASSUMPTIONS, Measured, limits_table, recommend, sweep

    kernel = document["kernel"]
    if "error" in kernel:
        return {"error": "no per-tile measurements: " + str(kernel["error"])[:300]}
    init = [
        probe["stages"]["split"]["init_s_median"]
        for probe in document["memory"]
        if "split" in probe.get("stages", {})
    ]
    measured_peaks = _worker_peaks(document)
    tile_sizes = sorted({int(row["tile_size"]) for row in kernel["tiles"]})
    # Tile sizes without a memory run: scale the measured part above the import baseline by
    # tile area from the nearest measured size (a tile's buffers are proportional to its area).
    peaks: dict[int, float] = {}
    for tile in tile_sizes:
        if tile in measured_peaks:
            peaks[tile] = measured_peaks[tile]
        elif measured_peaks:
            near = min(measured_peaks, key=lambda t: abs(t - tile))
            base = 90.0
            peaks[tile] = base + (measured_peaks[near] - base) * (tile / near) ** 2
    models: dict[str, Any] = {"assumptions": ASSUMPTIONS, "by_encoding": {}}
    for encoding in ("none", "deflate"):
        measured = Measured.from_kernel(
            kernel,
            encoding=encoding,
            source_bytes_per_px=float(kernel["source_bytes_per_px"]),
            init_s=statistics.median(init) if init else 1.5,
            worker_peak_mb=peaks,
        )
        predictions = sweep(measured, MODEL_SIZES_GP, tile_sizes, MODEL_CONCURRENCY)
        recommendation = recommend(predictions, 1000)
        models["by_encoding"][encoding] = {
            "measured": asdict(measured),
            "predictions": predictions,
            "recommendation": recommendation,
            "limits": limits_table(measured, recommendation["tile_size"], MODEL_CONCURRENCY),
        }
    models["worker_peak_mb_used"] = peaks
    models["init_s_used"] = statistics.median(init) if init else 1.5
    return models


def _pairs(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Each tilefan run against the peers on the same image and chain, as ratios."""
    peers: dict[tuple[float, str, str], dict[str, Any]] = {}
    for baseline in document["baselines"]:
        if "wall_s" in baseline:
            peers[(baseline["megapixels"], baseline["chain"], baseline["kind"])] = baseline
    pairs = []
    for run in document["runs"]:
        if "end_to_end_s" not in run:
            continue
        case = run["case"]
        row: dict[str, Any] = {
            "megapixels": case["megapixels"],
            "sweep": case["sweep"],
            "case": {k: case[k] for k in ("chain", "tile_size", "concurrency", "encoding")},
            "tilefan_s": run["end_to_end_s"],
            "tilefan_execution_s": run.get("execution_s"),
        }
        for kind in ("libvips", "dask"):
            peer = peers.get((case["megapixels"], case["chain"], kind))
            if peer:
                row[f"{kind}_s"] = peer["wall_s"]
                row[f"ratio_vs_{kind}"] = run["end_to_end_s"] / peer["wall_s"]
        pairs.append(row)
    return pairs


def _label(case: dict[str, Any]) -> str:
    return (
        f"{case['megapixels']:g}MP t{case['tile_size']} c{case['concurrency']} {case['encoding']}"
    )


def _targets(document: dict[str, Any]) -> dict[str, Any]:
    """Where the project stands against the issue's targets, with by how much."""
    targets: dict[str, Any] = {}
    size_pairs = [
        p
        for p in document["pairs"]
        if p["sweep"] == "size"
        and p["case"]["chain"] == "neighbourhood"
        and "ratio_vs_libvips" in p
    ]
    if size_pairs:
        largest = max(size_pairs, key=lambda p: p["megapixels"])
        ratio = largest["ratio_vs_libvips"]
        targets["end_to_end_vs_libvips"] = {
            "target": "<= 1.5x whole-image libvips on 500 MP",
            "measured_at_mp": largest["megapixels"],
            "ratio": round(ratio, 2),
            "met": ratio <= 1.5 and largest["megapixels"] >= 500,
            "miss_factor": round(ratio / 1.5, 2),
            "note": "" if largest["megapixels"] >= 500 else "measured below 500 MP: run --full",
        }
        if "ratio_vs_dask" in largest:
            targets["faster_than_dask"] = {
                "target": "faster than dask-image on the same job",
                "measured_at_mp": largest["megapixels"],
                "ratio": round(largest["ratio_vs_dask"], 2),
                "met": largest["ratio_vs_dask"] < 1.0,
            }
    runs = [r for r in document["runs"] if "orchestration_ms_per_tile" in r]
    serial = [r for r in runs if r["case"]["concurrency"] == 1]
    chosen = serial or runs
    if chosen:
        values = [r["orchestration_ms_per_tile"] for r in chosen]
        worst = max(values)
        targets["orchestration_per_tile"] = {
            "target": "< 20 ms per tile on the embedded engine",
            "measured_ms": [round(v, 1) for v in values],
            "from": "concurrency 1 runs (no CPU contention)" if serial else "all runs",
            "all_runs_ms": {
                _label(r["case"]): round(r["orchestration_ms_per_tile"], 1) for r in runs
            },
            "met": worst < 20,
            "miss_factor": round(worst / 20, 2),
        }
    probes = [p for p in document["memory"] if "stages" in p]
    by_tile: dict[int, list[float]] = {}
    for probe in probes:
        worker = probe["stages"].get("tile_batch")
        if worker:
            by_tile.setdefault(int(probe["case"]["tile_size"]), []).append(
                worker["peak_anon_over_baseline_mb"]
            )
    if by_tile:
        sizes = sorted(by_tile)
        peaks = [max(by_tile[s]) for s in sizes]
        same_tile = max(by_tile.values(), key=len)
        targets["worker_memory_set_by_tile_size"] = {
            "target": "tile worker peak memory set by the tile size",
            "peak_anon_over_baseline_mb_by_tile": dict(zip(sizes, peaks, strict=True)),
            "same_tile_across_image_sizes_mb": same_tile,
            "met": all(a <= b * 1.2 for a, b in itertools.pairwise(peaks))
            and (max(same_tile) <= min(same_tile) * 1.2 + 10),
        }
    for stage in ("split", "merge"):
        rows = sorted(
            (
                (p["case"]["megapixels"], p["stages"][stage])
                for p in probes
                if stage in p["stages"] and p["case"]["tile_size"] == 1024
            ),
            key=lambda row: row[0],
        )
        if len(rows) >= 2:
            small, large = rows[0], rows[-1]
            growth_anon = large[1]["peak_anon_mb"] / small[1]["peak_anon_mb"] - 1
            growth_rss = large[1]["peak_rss_mb"] / small[1]["peak_rss_mb"] - 1
            targets[f"{stage}_memory_flat"] = {
                "target": "peak memory flat (within 20%) from 100 MP to 1 GP",
                "from_mp": small[0],
                "to_mp": large[0],
                "peak_anon_mb": [small[1]["peak_anon_mb"], large[1]["peak_anon_mb"]],
                "peak_rss_mb": [small[1]["peak_rss_mb"], large[1]["peak_rss_mb"]],
                "growth_anon": round(growth_anon, 3),
                "growth_rss_including_mapped_files": round(growth_rss, 3),
                "met": growth_anon <= 0.2,
                "note": ""
                if (small[0], large[0]) == (100, 1000)
                else "not 100 MP to 1 GP: run --full",
            }
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks`` and ``tilefan bench``: failures are one line."""
    return guarded(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.key and not args.api:
        raise UsageError("--key needs --api")
    from benchmarks.report import write_report

    if args.report_only:
        document = json.loads(args.report_only.read_text())
        document["targets"] = _targets(document)
        write_report(document, args.report_only.parent)
        return 0
    document = run_profile(args)
    out = args.out or RESULTS / document["profile"]
    write_report(document, out)
    _log(f"results: {out}/results.json, {out}/summary.md")
    return 0

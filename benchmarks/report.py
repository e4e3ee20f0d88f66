"""The run's outputs: ``results.json``, ``summary.md`` and PNG plots, in one folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

PLOTS = {
    "stages.png": "Stage breakdown against the peers, by image size",
    "tile_size.png": "Throughput and tile latency against tile size",
    "concurrency.png": "Throughput against concurrency",
    "memory.png": "Peak memory per stage",
    "model.png": "Lambda model: wall time and cost per gigapixel",
}


def write_report(document: dict[str, Any], out: Path) -> None:
    """Write everything for ``document`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=1, default=str))
    made = _plots(document, out)
    (out / "summary.md").write_text(_markdown(document, made))


# --- Markdown ---------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if 0 < abs(value) < 0.1:
            return f"{value:.3g}"
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _section(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A ``## title`` heading and its table, as lines of the summary."""
    return [f"## {title}", "", _table(header, rows), ""]


CASE_HEADER = ["MP", "sweep", "chain", "tile", "conc.", "tile enc."]
"""The columns that say which tilefan case a row is, first in each table of cases."""


def _case_cells(case: Mapping[str, Any]) -> list[Any]:
    """``case``'s values for the ``CASE_HEADER`` columns."""
    keys = ("megapixels", "sweep", "chain", "tile_size", "concurrency", "encoding")
    return [case[key] for key in keys]


def _mp_per_s(run: dict[str, Any]) -> float | None:
    pixels = run.get("source_pixels") or run["case"]["megapixels"] * 1e6
    seconds = run.get("end_to_end_s")
    return pixels / 1e6 / seconds if seconds else None


def _markdown(document: dict[str, Any], plots: list[str]) -> str:
    machine = document["machine"]
    parts = [
        f"# Benchmark results: profile `{document['profile']}`",
        "",
        f"Run {document['started']} to {document.get('finished', '?')} on {machine['cpu_model']}, "
        f"{machine['logical_cpus']} logical CPUs, {machine['memory_gb']} GB, libvips "
        f"{machine['libvips']}, Python {machine['python']}. Load average at start "
        f"{machine['load_average_at_start']} (a shared machine: read the ratios, which pair runs "
        "made seconds apart, rather than the absolute times). "
        + (
            "Optional S3 checksums on."
            if document["settings"]["s3_checksums"]
            else "Optional S3 checksums off in the embedded engine (see docs/benchmarks.md)."
        ),
        "",
    ]
    rows = []
    for name, target in document.get("targets", {}).items():
        measured = {k: v for k, v in target.items() if k not in ("target", "met")}
        rows.append(
            [
                name,
                target["target"],
                "met" if target["met"] else "**missed**",
                json.dumps(measured, default=str)[:400],
            ]
        )
    parts += _section("Targets", ["target", "wanted", "result", "measured"], rows)

    rows = [
        # A pair keeps its size and sweep beside its case.
        [
            *_case_cells({**pair, **pair["case"]}),
            pair["tilefan_s"],
            pair.get("libvips_s"),
            pair.get("dask_s"),
            pair.get("ratio_vs_libvips"),
            pair.get("ratio_vs_dask"),
        ]
        for pair in document.get("pairs", [])
    ]
    parts += _section(
        "tilefan against the peers (same image, same chain, same TIFF encoder)",
        [*CASE_HEADER, "tilefan s", "libvips s", "dask s", "x libvips", "x dask"],
        rows,
    )

    rows = []
    for run in document.get("runs", []):
        if "error" in run:
            rows.append([*_case_cells(run["case"]), "error: " + str(run["error"])[:80]])
            continue
        timings = run.get("timings", {})
        storage = run.get("storage", {}).get("bytes", {})
        moved = sum(v for k, v in storage.items() if not k.startswith("client"))
        rows.append(
            [
                *_case_cells(run["case"]),
                timings.get("split"),
                timings.get("process"),
                timings.get("merge"),
                run.get("end_to_end_s"),
                _mp_per_s(run),
                run.get("tile_count"),
                run.get("tile_ms", {}).get("p50"),
                run.get("tile_ms", {}).get("p90"),
                run.get("orchestration_ms_per_tile"),
                moved / 1e6 if moved else None,
                run.get("memory", {}).get("peak_rss_mb"),
            ]
        )
    parts += _section(
        "tilefan runs",
        [
            *CASE_HEADER,
            "split s",
            "map s",
            "merge s",
            "end to end s",
            "MP/s",
            "tiles",
            "tile p50 ms",
            "tile p90 ms",
            "orchestration ms/tile",
            "storage MB",
            "engine peak RSS MB",
        ],
        rows,
    )

    rows = []
    for probe in document.get("memory", []):
        case = probe["case"]
        if "error" in probe:
            rows.append([case["megapixels"], case["tile_size"], "error", str(probe["error"])[:80]])
            continue
        for stage, figures in probe["stages"].items():
            rows.append(
                [
                    case["megapixels"],
                    case["tile_size"],
                    stage,
                    figures["invocations"],
                    figures["baseline_rss_mb"],
                    figures["peak_anon_mb"],
                    figures["peak_anon_over_baseline_mb"],
                    figures["peak_file_mb"],
                    figures["peak_rss_mb"],
                ]
            )
    parts += _section(
        "Peak memory per stage (one process per invocation)",
        [
            "MP",
            "tile",
            "stage",
            "invocations",
            "baseline RSS MB",
            "peak anon MB",
            "anon over baseline MB",
            "peak file-backed MB",
            "peak RSS (VmHWM) MB",
        ],
        rows,
    )

    model = document.get("model", {}).get("by_encoding", {}).get("deflate")
    if model:
        rec = model["recommendation"]
        parts += [
            "## Lambda model (a deflate TIFF result; see docs/benchmarks.md for sources)",
            "",
            f"Recommended tile size at concurrency {rec['concurrency']}: **{rec['tile_size']}**. "
            f"A serial stage (split or merge) is the longest stage from "
            f"{rec['serial_stage_dominates_from_gp']} GP; first limit broken: "
            f"{json.dumps(rec['first_infeasible'])}.",
            "",
        ]
        limits = [
            [
                row["concurrency"],
                row["map_dominates_up_to_gp"],
                row["split_within_timeout_up_to_gp"],
                row["merge_within_timeout_up_to_gp"],
                row["merge_fits_memory_up_to_gp"],
                row["parts_within_10000_up_to_gp"],
            ]
            for row in model["limits"]
        ]
        predictions = [
            [
                p["gigapixels"],
                p["tile_size"],
                p["concurrency"],
                p["split_s"],
                p["map_s"],
                p["merge_s"],
                p["wall_s"],
                p["bottleneck"],
                p["cost_per_gp_usd"],
                "yes" if p["feasible"] else "no",
            ]
            for p in model["predictions"]
            if p["tile_size"] == rec["tile_size"] or p["gigapixels"] in (1, 10)
        ]
        parts += [
            _table(
                [
                    "concurrency",
                    "map longest up to GP",
                    "split < 15 min up to GP",
                    "merge < 15 min up to GP",
                    "merger memory fits up to GP",
                    "10,000 parts suffice up to GP",
                ],
                limits,
            ),
            "",
            _table(
                [
                    "GP",
                    "tile",
                    "conc.",
                    "split s",
                    "map s",
                    "merge s",
                    "wall s",
                    "longest",
                    "$ per GP",
                    "within limits",
                ],
                predictions,
            ),
            "",
        ]

    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{PLOTS[name]}]({name})" for name in plots]
        parts.append("")
    return "\n".join(parts)


# --- plots ------------------------------------------------------------------------------------


def _plots(document: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    makers: dict[str, Callable[[Any, dict[str, Any]], bool]] = {
        "stages.png": _plot_stages,
        "tile_size.png": _plot_tile_size,
        "concurrency.png": _plot_concurrency,
        "memory.png": _plot_memory,
        "model.png": _plot_model,
    }
    for name, maker in makers.items():
        figure = plt.figure(figsize=(10, 4.5))
        try:
            if maker(figure, document):
                figure.tight_layout()
                figure.savefig(out / name, dpi=90)
                made.append(name)
        finally:
            plt.close(figure)
    return made


def _ok_runs(document: dict[str, Any], sweep: str) -> list[dict[str, Any]]:
    base = [r for r in document["runs"] if "end_to_end_s" in r]
    sweep_mp = document["settings"]["profile"]["sweep_mp"]
    if sweep == "size":
        rows = [r for r in base if r["case"]["sweep"] == "size"]
    else:
        default = document["settings"]["profile"]["base"]
        rows = [
            r
            for r in base
            if r["case"]["megapixels"] == sweep_mp
            and all(
                r["case"][k] == default[k]
                for k in ("chain", "tile_size", "concurrency", "encoding")
                if k != sweep
            )
        ]
    return sorted(rows, key=lambda r: r["case"]["megapixels" if sweep == "size" else sweep])


def _plot_stages(figure: Any, document: dict[str, Any]) -> bool:
    runs = _ok_runs(document, "size")
    if not runs:
        return False
    axis = figure.add_subplot(1, 1, 1)
    peers = {
        (b["megapixels"], b["kind"]): b["wall_s"]
        for b in document["baselines"]
        if "wall_s" in b and b["chain"] == "neighbourhood"
    }
    for position, run in enumerate(runs):
        timings, mp = run["timings"], run["case"]["megapixels"]
        bottom = 0.0
        other = run["end_to_end_s"] - sum(timings.values())
        for stage, colour in (("split", "#4c72b0"), ("process", "#55a868"), ("merge", "#c44e52")):
            value = timings.get(stage, 0.0)
            axis.bar(
                position * 4,
                value,
                bottom=bottom,
                color=colour,
                label=stage if position == 0 else None,
            )
            bottom += value
        axis.bar(
            position * 4,
            max(other, 0),
            bottom=bottom,
            color="#cccccc",
            label="upload, start, poll, download" if position == 0 else None,
        )
        for offset, kind, colour in ((1, "libvips", "#8172b2"), (2, "dask", "#ccb974")):
            if (mp, kind) in peers:
                axis.bar(
                    position * 4 + offset,
                    peers[(mp, kind)],
                    color=colour,
                    label=f"whole-image {kind}" if position == 0 else None,
                )
    axis.set_xticks([position * 4 + 1 for position in range(len(runs))])
    axis.set_xticklabels([f"{r['case']['megapixels']:g} MP" for r in runs])
    axis.set_ylabel("seconds")
    axis.set_title("tilefan (stacked stages) against whole-image libvips and dask-image")
    axis.legend(fontsize=8)
    return True


def _plot_tile_size(figure: Any, document: dict[str, Any]) -> bool:
    runs = _ok_runs(document, "tile_size")
    if len(runs) < 2:
        return False
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    sizes = [r["case"]["tile_size"] for r in runs]
    left.plot(sizes, [_mp_per_s(r) for r in runs], marker="o")
    left.set_xscale("log", base=2)
    left.set_xlabel("tile size (px)")
    left.set_ylabel("MP/s end to end")
    left.set_title(f"throughput, {runs[0]['case']['megapixels']:g} MP")
    right.boxplot([r["tile_ms_all"] for r in runs], showfliers=False)
    right.set_xticks(range(1, len(sizes) + 1), [str(size) for size in sizes])
    right.set_yscale("log")
    right.set_xlabel("tile size (px)")
    right.set_ylabel("tile duration (ms)")
    right.set_title("per-tile latency (fetch, compute, store)")
    return True


def _plot_concurrency(figure: Any, document: dict[str, Any]) -> bool:
    runs = _ok_runs(document, "concurrency")
    if len(runs) < 2:
        return False
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    workers = [r["case"]["concurrency"] for r in runs]
    left.plot(workers, [_mp_per_s(r) for r in runs], marker="o", label="end to end")
    left.plot(
        workers,
        [r["case"]["megapixels"] / r["timings"]["process"] for r in runs],
        marker="s",
        label="map stage only",
    )
    left.set_xlabel("MaxConcurrency")
    left.set_ylabel("MP/s")
    left.set_title(
        f"throughput, {runs[0]['case']['megapixels']:g} MP, "
        f"{document['machine']['logical_cpus']} CPUs"
    )
    left.legend(fontsize=8)
    right.plot(workers, [r["orchestration_ms_per_tile"] for r in runs], marker="o")
    right.axhline(20, color="grey", linestyle="--", label="target 20 ms")
    right.set_xlabel("MaxConcurrency")
    right.set_ylabel("ms per tile")
    right.set_title("orchestration overhead per tile")
    right.legend(fontsize=8)
    return True


def _plot_memory(figure: Any, document: dict[str, Any]) -> bool:
    probes = [p for p in document["memory"] if "stages" in p]
    if not probes:
        return False
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    same_tile = sorted(
        (p for p in probes if p["case"]["tile_size"] == 1024), key=lambda p: p["case"]["megapixels"]
    )
    for stage, marker in (("split", "o"), ("tile_batch", "s"), ("merge", "^")):
        rows = [
            (p["case"]["megapixels"], p["stages"][stage]) for p in same_tile if stage in p["stages"]
        ]
        if rows:
            left.plot(
                [r[0] for r in rows],
                [r[1]["peak_anon_mb"] for r in rows],
                marker=marker,
                label=f"{stage} (anon)",
            )
            left.plot(
                [r[0] for r in rows],
                [r[1]["peak_rss_mb"] for r in rows],
                marker=marker,
                linestyle=":",
                label=f"{stage} (RSS incl. mapped)",
            )
    left.set_xlabel("image size (MP), tile 1024")
    left.set_ylabel("peak MB")
    left.set_title("per stage, against image size")
    if same_tile:
        left.legend(fontsize=7)
    tiles = sorted(
        (
            p
            for p in probes
            if p["case"]["megapixels"] == document["settings"]["profile"]["sweep_mp"]
            and "tile_batch" in p["stages"]
        ),
        key=lambda p: p["case"]["tile_size"],
    )
    if tiles:
        right.plot(
            [p["case"]["tile_size"] for p in tiles],
            [p["stages"]["tile_batch"]["peak_anon_over_baseline_mb"] for p in tiles],
            marker="s",
        )
        right.set_xscale("log", base=2)
    right.set_xlabel("tile size (px)")
    right.set_ylabel("MB above the worker's import baseline")
    right.set_title("tile worker, against tile size")
    return True


def _plot_model(figure: Any, document: dict[str, Any]) -> bool:
    model = document.get("model", {}).get("by_encoding", {}).get("deflate")
    if not model:
        return False
    predictions = model["predictions"]
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    tile = model["recommendation"]["tile_size"]
    rows = sorted(
        (p for p in predictions if p["tile_size"] == tile and p["concurrency"] == 1000),
        key=lambda p: p["gigapixels"],
    )
    sizes = [p["gigapixels"] for p in rows]
    for stage in ("split_s", "map_s", "merge_s", "wall_s"):
        left.plot(sizes, [p[stage] for p in rows], marker="o", label=stage[:-2])
    left.axhline(900, color="grey", linestyle="--", label="Lambda 15 min")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("gigapixels")
    left.set_ylabel("predicted seconds")
    left.set_title(f"tile {tile}, concurrency 1000")
    if rows:
        left.legend(fontsize=7)
    for workers in sorted({p["concurrency"] for p in predictions}):
        chosen = sorted(
            (p for p in predictions if p["gigapixels"] == 1 and p["concurrency"] == workers),
            key=lambda p: p["tile_size"],
        )
        right.plot(
            [p["tile_size"] for p in chosen],
            [p["cost_per_gp_usd"] for p in chosen],
            marker="o",
            label=f"concurrency {workers}",
        )
    right.set_xscale("log", base=2)
    right.set_xlabel("tile size (px)")
    right.set_ylabel("predicted USD per gigapixel (1 GP job)")
    right.set_title("cost per gigapixel")
    right.legend(fontsize=7)
    return True

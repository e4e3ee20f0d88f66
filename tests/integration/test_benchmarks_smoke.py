"""The benchmark harness on a tiny profile: every part runs and the results carry every field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("dask_image", reason="the benchmark extra is not installed")
pytest.importorskip("matplotlib", reason="the benchmark extra is not installed")

from benchmarks.cli import main

pytestmark = pytest.mark.integration


def test_smoke_profile_writes_every_section_and_field(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert main(["--profile", "smoke", "--out", str(out), "--images", str(tmp_path)]) == 0

    document = json.loads((out / "results.json").read_text())
    assert {"machine", "runs", "baselines", "memory", "kernel", "model", "pairs", "targets"} <= set(
        document
    )
    assert document["machine"]["logical_cpus"] >= 1

    (run,) = document["runs"]
    assert "error" not in run, run.get("error")
    assert run["status"] == "SUCCEEDED"
    assert {"split", "process", "merge"} <= set(run["timings"])
    assert {"p50", "p90", "p99", "max"} <= set(run["tile_ms"])
    assert len(run["tile_ms_all"]) == run["tile_count"] > 1
    assert math.isfinite(run["orchestration_ms_per_tile"])
    bytes_moved = run["storage"]["bytes"]
    # The JPEG is transcoded once; the workers read their blocks of it by range.
    assert bytes_moved["split_write_transcode"] > 0 and bytes_moved["map_read_source"] > 0
    # A tiff result's tiles are copied server-side: the merger reads at most what was written.
    assert bytes_moved["map_write_tiles"] >= bytes_moved["merge_read_tiles"] > 0
    assert run["memory"]["peak_rss_mb"] > 0

    kinds = {baseline["kind"] for baseline in document["baselines"] if "wall_s" in baseline}
    assert kinds == {"libvips", "dask"}
    (pair,) = document["pairs"]
    assert pair["ratio_vs_libvips"] > 0 and pair["ratio_vs_dask"] > 0

    (probe,) = document["memory"]
    assert set(probe["stages"]) == {"split", "tile_batch", "merge"}
    for figures in probe["stages"].values():
        assert figures["peak_rss_mb"] >= figures["baseline_rss_mb"] > 0

    model = document["model"]["by_encoding"]["none"]
    assert model["recommendation"]["tile_size"] in {256, 512}
    assert {"wall_s", "cost_per_gp_usd", "bottleneck", "limits"} <= set(model["predictions"][0])
    assert all(entry["source"] for entry in document["model"]["assumptions"].values())

    assert {"orchestration_per_tile", "end_to_end_vs_libvips"} <= set(document["targets"])
    summary = (out / "summary.md").read_text()
    assert "## Targets" in summary and "stages.png" in summary
    assert (out / "stages.png").stat().st_size > 0


def test_a_tiled_tiff_source_is_read_by_range_not_transcoded(tmp_path: Path) -> None:
    out = tmp_path / "results"
    arguments = ["--profile", "smoke", "--source", "tiff", "--no-memory", "--no-kernel"]
    assert main([*arguments, "--no-dask", "--out", str(out), "--images", str(tmp_path)]) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["source"] == "tiff"
    (run,) = document["runs"]
    assert run["status"] == "SUCCEEDED"
    bytes_moved = run["storage"]["bytes"]
    # The workers read their blocks of the upload itself, which the splitter never rewrote.
    assert "split_write_transcode" not in bytes_moved and "map_read_source" not in bytes_moved
    assert bytes_moved["range_read_upload"] > 0
    assert [baseline["kind"] for baseline in document["baselines"]] == ["libvips"]

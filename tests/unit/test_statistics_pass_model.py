"""The statistics-pass benchmark measures the workers' range reads, and its model charges them."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks import model
from benchmarks.images import synthetic_tiled_tiff
from benchmarks.statistics_pass import measure, predict_pass
from tilefan.stages.statistics import REDUCE_THREADS
from tilefan.state.ranged import REQUESTS_IN_FLIGHT

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    source, _ = synthetic_tiled_tiff(1, tmp_path_factory.mktemp("pass"))
    return measure(source, 512)


def test_the_pass_reads_the_source_once_by_range_tile_by_tile(measured: dict[str, Any]) -> None:
    # 1000 x 1000 in 512-px tiles: 4 tiles, each 2 x 2 of the file's 256-px TIFF tiles.
    assert measured["tiles"] == 4
    tile_reads = measured["pass_read_requests"] - measured["directory_requests_per_open"]
    # One ranged GET per row of a block's TIFF tiles (the prefetch: not one per TIFF tile, 16);
    # the directory is read once, by the pass's one open.
    assert tile_reads == 2 * 4, tile_reads
    tile_bytes = measured["pass_read_bytes"] - measured["directory_bytes_per_open"]
    assert 0.9 < tile_bytes / measured["source_bytes"] < 1.1, "the source once, no more"
    assert measured["partial_bytes_per_item"] > 0 and measured["combined_bytes"] > 0


def test_the_model_charges_each_range_read_and_no_cut_tiles(measured: dict[str, Any]) -> None:
    base = predict_pass(measured, 10, 1024, 1000)
    assert "cut_s" not in base and base["extra_wall_s"] == base["map_s"] + base["reduce_s"]
    extra = REQUESTS_IN_FLIGHT * measured["tiles"]
    more = dict(measured, pass_read_requests=measured["pass_read_requests"] + extra)
    slower = predict_pass(more, 10, 1024, 1000)
    # A block's GETs go out together: as many more as are in flight is one more latency a tile.
    latency = model.ASSUMPTIONS["s3_request_latency_s"]["value"]
    assert slower["tile_s"] - base["tile_s"] == pytest.approx(latency)
    assert slower["extra_cost_usd"] > base["extra_cost_usd"]


def test_the_model_reduce_reads_the_partials_in_parallel(measured: dict[str, Any]) -> None:
    predicted = predict_pass(measured, 10, 1024, 1000)
    latency = model.ASSUMPTIONS["s3_request_latency_s"]["value"]
    rounds = math.ceil(predicted["items"] / REDUCE_THREADS)
    assert rounds * latency < predicted["reduce_s"] < predicted["items"] * latency

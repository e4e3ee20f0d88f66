"""The Lambda model follows the stages as built: header reads, transcode, range reads, copies."""

from __future__ import annotations

import math

import pytest

from benchmarks import model
from benchmarks.model import ASSUMPTIONS, MIN_PART, Measured, headline, predict

pytestmark = pytest.mark.unit

TILES = (1024, 2048, 4096)


def measured() -> Measured:
    """Round figures of the kind the kernel measures (a blurred noisy RGB image)."""
    return Measured(
        tile_cpu_s_per_mp={tile: 0.2 for tile in TILES},
        tile_bytes_in_per_px={tile: 2.2 for tile in TILES},
        tile_bytes_out_per_px={tile: 0.85 for tile in TILES},
        transcode_mp_per_cpu_s=16.8,
        transcode_bytes_per_px=2.1,
        merge_encode_mp_per_cpu_s=9.0,
        output_bytes_per_px=0.55,
        source_bytes_per_px=0.4,
        init_s=1.8,
        worker_peak_mb={1024: 133.0, 2048: 262.0, 4096: 780.0},
    )


def test_a_tiled_upload_is_split_in_the_same_time_at_any_size() -> None:
    small, large = (predict(measured(), gp, 2048, 1000) for gp in (0.1, 10))
    assert small["split_parts"]["transcode"] == large["split_parts"]["transcode"] == 0
    assert large["split_s"] - small["split_s"] < 0.5


def test_a_jpeg_is_transcoded_on_one_thread_in_time_proportional_to_its_pixels() -> None:
    one, four = (predict(measured(), gp, 2048, 1000, source="jpeg") for gp in (1, 4))
    assert one["split_parts"]["transcode"] == pytest.approx(1000 / 16.8)
    assert four["split_parts"]["transcode"] == pytest.approx(4 * one["split_parts"]["transcode"])


def test_the_merger_copies_level_ranges_of_5_mib_and_gathers_the_rest() -> None:
    cog = predict(measured(), 10, 2048, 1000, pyramid=True)
    items, per_item = cog["items"], cog["tiles_per_item"]
    item_bytes = per_item * 2048**2 * 0.85
    copied_levels = sum(item_bytes / 4**level >= MIN_PART for level in range(4))
    assert cog["merge_requests"]["copies"] == items * copied_levels
    assert cog["merge_requests"]["small_reads"] == items * (4 - copied_levels)
    flat = predict(measured(), 10, 2048, 1000)
    assert flat["merge_requests"] == {"copies": items, "small_reads": 0, "plain_parts": 1}
    assert flat["merge_parts"]["coarse_encode"] == 0 < cog["merge_parts"]["coarse_encode"]


def test_batches_follow_the_splitters_rule_for_tiff_results() -> None:
    # 1024 px deflate tiles: enough of them to pass two minimum parts, within 16 MP.
    assert predict(measured(), 1, 1024, 100)["tiles_per_item"] == math.ceil(
        2 * MIN_PART / (1024**2 * 3 * 0.4)
    )
    assert predict(measured(), 1, 4096, 100)["tiles_per_item"] == model.TILES_PER_ITEM


def test_concurrent_block_reads_shorten_the_map_and_its_cost() -> None:
    serial = predict(measured(), 10, 2048, 1000, pyramid=True)
    prefetched = predict(measured(), 10, 2048, 1000, pyramid=True, reads_in_flight=16)
    assert prefetched["map_s"] < serial["map_s"] / 2
    assert prefetched["cost_usd"] < serial["cost_usd"]


def test_the_headline_reports_the_largest_jpeg_with_its_transcode() -> None:
    figures = headline(measured())
    jpeg = figures["largest_jpeg"]
    assert jpeg["gigapixels"] == pytest.approx(65_535**2 / 1e9)
    assert jpeg["split_parts"]["transcode"] > 60
    assert {row["tile_size"] for row in figures["cog_10gp"]} == set(TILES)


def test_every_assumption_names_its_source() -> None:
    assert all(entry["source"] and entry["note"] for entry in ASSUMPTIONS.values())

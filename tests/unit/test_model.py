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


def test_workers_copy_level_ranges_of_5_mib_and_the_merger_gathers_the_rest() -> None:
    cog = predict(measured(), 10, 2048, 1000, pyramid=True)
    items, per_item = cog["items"], cog["tiles_per_item"]
    item_bytes = per_item * 2048**2 * 0.85
    copied_levels = sum(item_bytes / 4**level >= MIN_PART for level in range(4))
    # The levels under 5 MiB come joined, one range per group of batches (the second fan-out).
    groups = cog["compaction_groups"]
    assert 0 < groups < items and cog["fanout_s"] > 0
    requests = cog["merge_requests"]
    assert requests["worker_copies"] == items * copied_levels
    # The merger copies once per level the workers copied (the range its short part is
    # topped up from), and takes a range of each joined level and of each level a fan-out
    # group reduced (1024 px: three levels each).
    assert requests["copies"] + requests["small_reads"] == (
        copied_levels + groups * (4 - copied_levels) + cog["reduce_groups"] * 3
    )
    flat = predict(measured(), 10, 2048, 1000)
    assert flat["merge_requests"] == {
        "copies": 1,
        "worker_copies": flat["items"],
        "small_reads": 0,
        "plain_parts": 1,
    }
    assert flat["merge_parts"]["coarse_encode"] == 0 < cog["merge_parts"]["coarse_encode"]


def test_batches_follow_the_splitters_rule_for_tiff_results() -> None:
    # 1024 px deflate tiles: enough of them to pass two minimum parts, within 16 MP.
    assert predict(measured(), 1, 1024, 100)["tiles_per_item"] == math.ceil(
        2 * MIN_PART / (1024**2 * 3 * 0.4)
    )
    assert predict(measured(), 1, 4096, 100)["tiles_per_item"] == model.TILES_PER_ITEM


def test_a_block_is_read_in_a_request_per_row_of_tiff_tiles_sent_together() -> None:
    built = predict(measured(), 10, 2048, 1000, pyramid=True)
    rows = 2048 // 256 + 2  # the tile and its halo, in 256 px TIFF tiles
    assert built["tile_read_requests"] == rows
    block_bytes = rows**2 * 256**2 * 2.2
    latency = ASSUMPTIONS["s3_small_get_latency_s"]["value"]
    rounds = math.ceil(rows / model.REQUESTS_IN_FLIGHT)
    assert rounds == 2
    assert built["tile_read_s"] == pytest.approx(
        rounds * latency + block_bytes / (ASSUMPTIONS["network_mb_per_s"]["value"] * 1e6)
    )
    # The chain's copies of the block are the peak, not the crop beside its fetched bytes;
    # beside them, the batch's encoded levels until its object is written.
    held_mb = built["tiles_per_item"] * 2048**2 * 0.85 / 2**20 * 4 / 3
    assert built["worker_memory_mb"] == pytest.approx(262 + held_mb)
    thin = Measured(**{**measured().__dict__, "worker_peak_mb": {2048: 100.0}})
    crop_mb = 160 + (2048 + 512) ** 2 * 3 / 2**20 + block_bytes / 2**20
    flat = predict(thin, 10, 2048, 1000)
    flat_held_mb = flat["tiles_per_item"] * 2048**2 * 0.85 / 2**20
    assert flat["worker_memory_mb"] == pytest.approx(crop_mb + flat_held_mb)


def test_the_prefetch_divides_the_map_and_its_gets_against_one_tiff_tile_per_get() -> None:
    built = predict(measured(), 10, 2048, 1000, pyramid=True)
    serial = predict(measured(), 10, 2048, 1000, pyramid=True, prefetch=False)
    assert serial["tile_read_requests"] == 10**2 == 10 * built["tile_read_requests"]
    assert built["map_s"] < serial["map_s"] / 2
    assert built["cost_parts"]["s3_requests"] < serial["cost_parts"]["s3_requests"]
    assert built["cost_usd"] < serial["cost_usd"] / 2
    assert built["merge_s"] == serial["merge_s"]  # the merger reads no source


def test_a_row_larger_than_a_request_is_split_into_several() -> None:
    heavy = measured()
    heavy = Measured(**{**heavy.__dict__, "tile_bytes_in_per_px": {4096: 200.0}})
    rows = 4096 // 256 + 2
    row_bytes = rows * 256**2 * 200.0
    per_row = math.ceil(row_bytes / model.REQUEST_BYTES)
    assert per_row > 1
    assert predict(heavy, 10, 4096, 1000)["tile_read_requests"] == rows * per_row


def test_a_cogs_batches_are_sized_for_its_first_three_levels_to_be_copied() -> None:
    """The splitter's rule for a pyramid: a batch's levels 0 to 2 each pass S3's 5 MiB part
    minimum, so their workers copy them and the merger gathers less through itself."""
    for tile in (2048, 4096):
        built = predict(measured(), 10, tile, 1000, pyramid=True)
        level_bytes = built["tiles_per_item"] * tile**2 * 0.85 / 16
        assert level_bytes >= MIN_PART
        assert built["merge_requests"]["worker_copies"] >= 3 * built["items"]
        level_0 = predict(
            measured(), 10, tile, 1000, pyramid=True, batch_tiles=model.TILES_PER_ITEM
        )
        # Since the second fan-out, small levels of either rule's batches come joined.
        assert built["merge_gathered_mb"] <= level_0["merge_gathered_mb"]
        assert built["merge_s"] < level_0["merge_s"]


def test_the_headline_reports_the_largest_jpeg_with_its_transcode() -> None:
    figures = headline(measured())
    jpeg = figures["largest_jpeg"]
    assert jpeg["gigapixels"] == pytest.approx(65_535**2 / 1e9)
    assert jpeg["split_parts"]["transcode"] > 60
    assert {row["tile_size"] for row in figures["cog_10gp"]} == set(TILES)
    assert all(row["feasible"] for row in figures["cog_10gp"])
    before = {row["tile_size"]: row["wall_s"] for row in figures["cog_10gp_before_prefetch"]}
    assert all(row["wall_s"] < before[row["tile_size"]] for row in figures["cog_10gp"])
    level_0 = {row["tile_size"]: row for row in figures["cog_10gp_level_0_batches"]}
    assert all(row["merge_s"] < level_0[row["tile_size"]]["merge_s"] for row in figures["cog_10gp"])


def test_every_assumption_names_its_source() -> None:
    assert all(entry["source"] and entry["note"] for entry in ASSUMPTIONS.values())


def test_the_first_coarse_level_of_a_large_cog_is_reduced_by_the_second_fanout() -> None:
    """At 1024 px, blocks hold three levels: level 3 of 10 GP is 12,500 px a side, 13 x 13
    fan-out groups of 1024 px; the merger encodes from level 6 on, so its share grows with the
    image at 1/4096 of its pixels, not 1/64."""
    ten, one = (predict(measured(), gp, 1024, 1000, pyramid=True) for gp in (10, 1))
    assert ten["reduce_groups"] == 13 * 13 and ten["fanout_s"] > 0
    assert ten["reduce_parts"]["encode"] == one["reduce_parts"]["encode"]
    merger_px = sum(10e9 / 4**level for level in range(6, 64) if 10e9 / 4**level >= 256**2)
    rate = ten["merge_parts"]["coarse_encode"] / merger_px
    assert one["merge_parts"]["coarse_encode"] == pytest.approx(
        rate * sum(1e9 / 4**level for level in range(6, 64) if 1e9 / 4**level >= 256**2)
    )
    assert predict(measured(), 0.05, 1024, 1000, pyramid=True)["reduce_groups"] == 0

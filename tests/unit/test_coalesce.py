"""A prefetch's ranges merge into few requests without reading far beyond what was asked."""

from __future__ import annotations

import pytest

from tilefan.state.ranged import GAP_BYTES, REQUEST_BYTES, coalesce

pytestmark = pytest.mark.unit


def test_adjacent_and_nearby_ranges_become_one_request() -> None:
    # A row of TIFF tiles lies end to end; padding of a few bytes between them is bridged.
    row = [(0, 100), (100, 250), (252, 400)]
    assert coalesce(row) == [(0, 400)]


def test_ranges_further_apart_than_the_gap_stay_apart() -> None:
    rows = [(0, 100), (100 + GAP_BYTES + 1, 200 + GAP_BYTES)]
    assert coalesce(rows) == rows


def test_a_merged_request_stops_at_the_largest_size_and_no_range_is_split() -> None:
    half = REQUEST_BYTES // 2 + 1
    tiles = [(index * half, (index + 1) * half) for index in range(4)]
    assert coalesce(tiles) == [tiles[0], tiles[1], tiles[2], tiles[3]]
    assert coalesce([(0, 3 * REQUEST_BYTES)]) == [(0, 3 * REQUEST_BYTES)]
    quarter = REQUEST_BYTES // 4
    small = [(index * quarter, (index + 1) * quarter) for index in range(8)]
    assert coalesce(small) == [(0, REQUEST_BYTES), (REQUEST_BYTES, 2 * REQUEST_BYTES)]


def test_order_and_repeats_do_not_matter() -> None:
    far = 10 * GAP_BYTES
    assert coalesce([(far, far + 9), (0, 100), (0, 100), (100, 200)]) == [(0, 200), (far, far + 9)]

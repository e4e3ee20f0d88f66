"""A prefetch's ranges merge into few requests without reading far beyond what was asked, and
what a block needs stays kept until it is read, whatever the cache's bound."""

from __future__ import annotations

import io
from typing import Any

import pytest

import tilefan.state.ranged
from tilefan.state.ranged import GAP_BYTES, REQUEST_BYTES, RangedObject, coalesce

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


class _Bytes:
    """An S3 client over one object in memory, counting its ranged GETs."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[tuple[int, int]] = []

    def head_object(self, **kwargs: Any) -> dict[str, Any]:
        return {"ContentLength": len(self.data)}

    def get_object(self, *, Range: str, **kwargs: Any) -> dict[str, Any]:  # noqa: N803
        start, last = (int(n) for n in Range.removeprefix("bytes=").split("-"))
        self.ranges.append((start, last + 1))
        return {"Body": io.BytesIO(self.data[start : last + 1])}


TILE = 100_000
"""A TIFF tile's bytes, over the 64 KiB block size: libtiff reads each in one read."""


def _tiles(*numbers: int) -> list[tuple[int, int]]:
    return [(number * TILE, (number + 1) * TILE) for number in numbers]


def test_a_block_larger_than_the_cache_is_kept_whole_until_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tilefan.state.ranged, "CACHED_BYTES", TILE)
    client = _Bytes(bytes(range(256)) * (40 * TILE // 256))
    remote = RangedObject(client, "bucket", "key")  # type: ignore[arg-type]
    first = _tiles(0, 1, 2, 10, 11, 12)  # two rows of three TIFF tiles
    remote.prefetch(first)
    assert sorted(client.ranges) == [(0, 3 * TILE), (10 * TILE, 13 * TILE)]  # sent at once
    for start, end in first:
        assert remote.read(start, end - start) == client.data[start:end]
    remote.settle()
    assert remote.kept_bytes <= 3 * TILE  # the cache's bound, or the last request
    # The next block shares a column with the first: what is still kept is not fetched again,
    # and all it needs stays kept while it is read, though it is five times the bound.
    client.ranges.clear()
    second = _tiles(2, 3, 4, 12, 13, 14)
    remote.prefetch(second)
    fetched = sum(end - start for start, end in client.ranges)
    assert fetched <= 6 * TILE
    client.ranges.clear()
    for start, end in second:
        assert remote.read(start, end - start) == client.data[start:end]
    assert client.ranges == []

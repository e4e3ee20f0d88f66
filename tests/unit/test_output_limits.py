"""Results that cannot be made are refused by size: format limits and the merger's time."""

from __future__ import annotations

import pytest

from tilefan.errors import OutputTooLarge
from tilefan.formats.output_limits import (
    ENCODE_MEGAPIXELS_PER_SECOND,
    ENCODE_SHARE,
    check_output,
    check_output_of_input,
    predicted_merge_seconds,
)
from tilefan.imaging.operations import parse_chain

pytestmark = pytest.mark.unit

TIMEOUT = 900
MEMORY = 10_240  # Lambda's largest, so that only what a test is about refuses
MERGER: dict[str, int] = {"merger_timeout": TIMEOUT, "merger_memory_mb": MEMORY}


@pytest.mark.parametrize(
    ("fmt", "width", "height", "refused"),
    [
        ("jpeg", 65_535, 1_000, False),
        ("jpeg", 65_536, 1_000, True),
        ("jpeg", 1_000, 65_536, True),
        ("webp", 16_383, 100, False),
        ("webp", 16_384, 100, True),
        ("png", 100_000, 100, False),  # PNG stores 2^31 - 1 a side
        ("tiff", 10**6, 10**6, False),  # not streamed: its merger has its own bounds
    ],
)
def test_sides_beyond_the_format_are_refused(
    fmt: str, width: int, height: int, refused: bool
) -> None:
    if refused:
        with pytest.raises(OutputTooLarge, match="a side") as caught:
            check_output(fmt, {}, width, height, **MERGER)
        assert caught.value.code == "OUTPUT_TOO_LARGE"
    else:
        check_output(fmt, {}, width, height, **MERGER)


def test_results_too_slow_to_encode_in_the_timeout_are_refused() -> None:
    # The largest png the model lets through, and one a little larger.
    limit = ENCODE_SHARE * TIMEOUT * ENCODE_MEGAPIXELS_PER_SECOND["png"] * 1e6
    side = int(limit**0.5)
    check_output("png", {}, side, side, **MERGER)
    with pytest.raises(OutputTooLarge, match="would take about"):
        check_output("png", {}, side + 100, side + 100, **MERGER)


def test_lossless_webp_is_modelled_at_its_own_rate() -> None:
    lossy = predicted_merge_seconds("webp", {}, 10_000, 10_000)
    lossless = predicted_merge_seconds("webp", {"lossless": True}, 10_000, 10_000)
    assert (
        lossless
        == lossy
        * ENCODE_MEGAPIXELS_PER_SECOND["webp"]
        / (ENCODE_MEGAPIXELS_PER_SECOND["webp-lossless"])
    )
    check_output("webp", {}, 10_000, 10_000, **MERGER)
    with pytest.raises(OutputTooLarge):
        check_output("webp", {"lossless": True}, 10_000, 10_000, **MERGER)


def test_sixteen_bit_png_takes_longer_than_eight_bit() -> None:
    eight = predicted_merge_seconds("png", {}, 1000, 1000, bands=3, pixel_format="uchar")
    sixteen = predicted_merge_seconds("png", {}, 1000, 1000, bands=3, pixel_format="ushort")
    grey = predicted_merge_seconds("png", {}, 1000, 1000, bands=1, pixel_format="uchar")
    assert sixteen == 2 * eight
    assert grey == eight  # never predicted faster than the measured RGB rate


def test_the_output_size_follows_the_chain() -> None:
    enlarge = parse_chain([{"op": "resize", "scale": 16}])
    check_output_of_input(parse_chain([]), "webp", {}, 1000, 800, **MERGER)
    with pytest.raises(OutputTooLarge, match="17,600x12,800"):
        check_output_of_input(enlarge, "webp", {}, 1100, 800, **MERGER)
    rotate = parse_chain([{"op": "rot", "angle": "d90"}])
    with pytest.raises(OutputTooLarge, match="100x70,000"):
        check_output_of_input(rotate, "jpeg", {}, 70_000, 100, **MERGER)


def test_webp_larger_than_the_merger_can_hold_is_refused() -> None:
    # libwebp holds the whole picture: about 40 bytes a pixel.
    check_output("webp", {}, 7_000, 7_000, merger_timeout=TIMEOUT, merger_memory_mb=3008)
    with pytest.raises(OutputTooLarge, match="needs about"):
        check_output("webp", {}, 9_000, 9_000, merger_timeout=TIMEOUT, merger_memory_mb=3008)
    check_output("webp", {}, 9_000, 9_000, merger_timeout=TIMEOUT, merger_memory_mb=10_240)
    # The largest webp is more than Lambda's largest function can hold.
    with pytest.raises(OutputTooLarge, match="needs about"):
        check_output("webp", {}, 16_383, 16_383, merger_timeout=TIMEOUT, merger_memory_mb=10_240)
    # jpeg and png stream: their memory does not depend on the image's size.
    check_output("jpeg", {}, 60_000, 60_000, merger_timeout=10**6, merger_memory_mb=512)

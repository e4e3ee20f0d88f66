"""Whole-image steps and image statistics: tiled, through statistics passes, equal libvips'."""

from __future__ import annotations

from functools import reduce
from typing import Any

import numpy as np
import pytest
import pyvips
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import assert_identical, shared_image, shared_image_names
from tilefan import ImageSpec, InvalidChain, check_chain, parse_chain, process_tiled
from tilefan.imaging.execute import statistics_passes, statistics_tiled
from tilefan.imaging.statistics import Statistics

pytestmark = pytest.mark.unit


def whole(image: pyvips.Image, ops: list[dict[str, Any]]) -> pyvips.Image:
    """The chain run by libvips on the whole image: the reference."""
    return reduce(lambda im, step: step.apply(im), parse_chain(ops), image)


def skewed_image(
    width: int, height: int, bands: int = 1, fmt: str = "uchar", seed: int = 0
) -> pyvips.Image:
    """Pixels crowded at the dark end with a long bright tail, and a narrow range per band.

    Equalisation moves such a histogram a lot, so a LUT built from any one tile shows; the
    narrow ushort range makes libvips' histogram narrower than 65536 bins.
    """
    rng = np.random.default_rng(seed)
    tail = rng.exponential(1.0, (height, width, bands)) ** 2
    if fmt == "uchar":
        pixels = np.clip(tail * 20 + 3, 0, 255).astype(np.uint8)
    elif fmt == "ushort":
        offsets = 1000 + 500 * np.arange(bands)
        pixels = np.clip(tail * 300 + offsets, 0, 65535).astype(np.uint16)
    else:
        pixels = (tail * 40 - 7).astype(np.float32)
    return pyvips.Image.new_from_array(pixels)


def _compatible(image: pyvips.Image, ops: list[dict[str, Any]]) -> bool:
    try:
        check_chain(parse_chain(ops), ImageSpec.of(image))
        whole(image, ops).avg()
    except (InvalidChain, pyvips.Error):
        return False
    return True


ALONE = [
    [{"op": "hist_equal"}],
    [{"op": "hist_equal", "band": 0}],
    [{"op": "scale"}],
    [{"op": "scale", "log": True, "exp": 0.5}],
    [{"op": "hist_local", "width": 9, "height": 9}],
    [{"op": "hist_local", "width": 16, "height": 7, "max_slope": 3}],
]


@pytest.mark.parametrize("ops", ALONE, ids=str)
@pytest.mark.parametrize("fmt", ["uchar", "ushort", "float"])
@pytest.mark.parametrize("bands", [1, 2, 3, 4])
@pytest.mark.parametrize("tile_size", [64, 97, 256])
def test_each_whole_image_step_alone_equals_libvips(
    ops: list[dict[str, Any]], fmt: str, bands: int, tile_size: int
) -> None:
    image = skewed_image(233, 171, bands, fmt)
    if not _compatible(image, ops):
        pytest.skip(f"libvips itself refuses this step on {bands}-band {fmt}")
    assert_identical(whole(image, ops), process_tiled(image, ops, tile_size=tile_size))


CHAINS = [
    [{"op": "gaussblur", "sigma": 2}, {"op": "hist_equal"}, {"op": "median", "size": 5}],
    [{"op": "hist_equal"}, {"op": "rot", "angle": "d90"}, {"op": "scale"}],
    [{"op": "shrink", "hshrink": 2, "vshrink": 3}, {"op": "scale"}, {"op": "hist_equal"}],
    [{"op": "scale", "log": True}, {"op": "hist_local", "width": 11, "height": 5}, {"op": "sobel"}],
    [
        {"op": "linear", "a": 0.5, "b": 3, "uchar": True},
        {"op": "hist_local", "width": 7, "height": 7},
    ],
    [{"op": "hist_equal", "band": 1}, {"op": "sharpen"}, {"op": "hist_equal"}, {"op": "invert"}],
]


@pytest.mark.parametrize("ops", CHAINS, ids=lambda ops: "+".join(s["op"] for s in ops))
@pytest.mark.parametrize("fmt", ["uchar", "ushort", "float"])
@pytest.mark.parametrize("bands", [1, 3, 4])
def test_whole_image_steps_inside_chains_equal_libvips(
    ops: list[dict[str, Any]], fmt: str, bands: int
) -> None:
    image = skewed_image(201, 149, bands, fmt, seed=7)
    if not _compatible(image, ops):
        pytest.skip(f"libvips itself refuses this chain on {bands}-band {fmt}")
    assert_identical(whole(image, ops), process_tiled(image, ops, tile_size=64))


def test_equalising_each_tile_on_its_own_would_differ() -> None:
    """The check has teeth: per-tile histograms give visible seams, the pass does not."""
    image = skewed_image(256, 256, 1, "uchar")
    tiles = [
        image.crop(x, y, 64, 64).hist_equal() for y in range(0, 256, 64) for x in range(0, 256, 64)
    ]
    per_tile = pyvips.Image.arrayjoin(tiles, across=4)
    with pytest.raises(AssertionError):
        assert_identical(image.hist_equal(), per_tile)
    assert_identical(image.hist_equal(), process_tiled(image, [{"op": "hist_equal"}], tile_size=64))


def test_scale_of_a_flat_image_is_black_as_in_libvips() -> None:
    image = (pyvips.Image.black(150, 90, bands=2) + 42).cast("ushort")
    assert_identical(
        whole(image, [{"op": "scale"}]), process_tiled(image, [{"op": "scale"}], tile_size=64)
    )


def test_log_scale_of_an_all_negative_image_equals_libvips() -> None:
    """libvips' C arithmetic makes NaN of a negative maximum's root (every pixel 255)."""
    image = pyvips.Image.gaussnoise(150, 90, mean=-20000, sigma=300).cast("short")
    ops = [{"op": "scale", "log": True}]
    assert_identical(whole(image, ops), process_tiled(image, ops, tile_size=64))


def test_a_pass_per_global_step_and_one_for_a_stats_output() -> None:
    chain = parse_chain(CHAINS[5])
    spec = ImageSpec(100, 100, 3, "uchar", "srgb")
    passes = statistics_passes(chain, spec)
    assert [(p.upto, p.histogram) for p in passes] == [(0, True), (2, True)]
    with_output = statistics_passes(chain, spec, output_statistics=True)
    assert [(p.upto, p.histogram) for p in with_output] == [(0, True), (2, True), (4, True)]
    assert statistics_passes(parse_chain([{"op": "gaussblur", "sigma": 1}]), spec) == []


GLOBAL = st.one_of(
    st.builds(
        lambda b: {"op": "hist_equal"} | ({} if b is None else {"band": b}),
        st.sampled_from([None, 0]),
    ),
    st.builds(
        lambda log, e: {"op": "scale", "log": log, "exp": e}, st.booleans(), st.floats(0.1, 3)
    ),
    st.builds(
        lambda w, h, m: {"op": "hist_local", "width": w, "height": h, "max_slope": m},
        st.integers(1, 25),
        st.integers(1, 25),
        st.integers(0, 5),
    ),
)
LOCAL = st.one_of(
    st.builds(lambda s: {"op": "gaussblur", "sigma": s}, st.floats(0.3, 4)),
    st.builds(lambda n: {"op": "median", "size": n}, st.integers(1, 5)),
    st.just({"op": "invert"}),
    st.just({"op": "linear", "a": 1.5, "b": -10, "uchar": True}),
    st.builds(lambda a: {"op": "rot", "angle": a}, st.sampled_from(["d90", "d180", "d270"])),
    st.builds(
        lambda h, v: {"op": "shrink", "hshrink": h, "vshrink": v},
        st.integers(1, 3),
        st.integers(1, 3),
    ),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    width=st.integers(25, 500),
    height=st.integers(25, 500),
    bands=st.integers(1, 4),
    fmt=st.sampled_from(["uchar", "ushort", "float"]),
    tile_size=st.integers(64, 300),
    ops=st.lists(st.one_of(GLOBAL, LOCAL), min_size=1, max_size=4).filter(
        lambda ops: any(s["op"] in ("hist_equal", "scale", "hist_local") for s in ops)
    ),
    seed=st.integers(0, 2**16),
)
def test_tiled_equals_whole_for_any_chain_with_whole_image_steps(
    width: int,
    height: int,
    bands: int,
    fmt: str,
    tile_size: int,
    ops: list[dict[str, Any]],
    seed: int,
) -> None:
    image = skewed_image(width, height, bands, fmt, seed)
    if not _compatible(image, ops):
        return
    assert_identical(whole(image, ops), process_tiled(image, ops, tile_size=tile_size))


def assert_stats_match(image: pyvips.Image, found: Statistics) -> None:
    """Sums within 1e-9 relative, extremes and histograms exactly, positions on an extreme."""
    reference = np.array(image.stats().tolist())
    document = found.document()
    rows = [document["all"], *document["per_band"]]
    for expected, row in zip(reference, rows, strict=True):
        assert (row["min"], row["max"]) == (expected[0], expected[1])
        np.testing.assert_allclose(
            [row["sum"], row["sum2"], row["mean"], row["deviation"]], expected[2:6], rtol=1e-9
        )
    pixels = image.numpy().reshape(image.height, image.width, -1)
    for band, row in enumerate(document["per_band"]):
        assert pixels[row["y_min"], row["x_min"], band] == row["min"]
        assert pixels[row["y_max"], row["x_max"], band] == row["max"]
    if image.format in ("uchar", "ushort"):
        histogram = image.hist_find().numpy().reshape(-1, image.bands).T
        assert document["histogram"] == histogram.tolist()
    else:
        assert "histogram" not in document


@pytest.mark.parametrize("fmt", ["uchar", "ushort", "float"])
@pytest.mark.parametrize("bands", [1, 2, 3, 4])
@pytest.mark.parametrize("tile_size", [64, 150])
def test_stats_output_equals_libvips_stats(fmt: str, bands: int, tile_size: int) -> None:
    image = skewed_image(311, 203, bands, fmt, seed=3)
    assert_stats_match(image, statistics_tiled(image, [], tile_size=tile_size))


@pytest.mark.parametrize("ops", CHAINS[:3], ids=lambda ops: "+".join(s["op"] for s in ops))
def test_stats_output_is_of_the_chains_result(ops: list[dict[str, Any]]) -> None:
    image = skewed_image(190, 170, 3, "ushort", seed=5)
    assert_stats_match(whole(image, ops), statistics_tiled(image, ops, tile_size=64))


def test_statistics_survive_their_stored_form() -> None:
    image = skewed_image(120, 80, 3, "ushort")
    found = Statistics.of_tile(image, 5, 9, histogram=True)
    again = Statistics.from_bytes(found.to_bytes())
    assert again.document() == found.document()
    assert again.pixels == 120 * 80 and again.pixel_format == "ushort"


def _loadable_shared_images() -> list[str]:
    return shared_image_names() or ["(none)"]


@pytest.mark.shared_images
@pytest.mark.parametrize("name", _loadable_shared_images())
@pytest.mark.parametrize(
    "ops",
    [ALONE[0], ALONE[2], ALONE[4], CHAINS[0]],
    ids=lambda ops: "+".join(s["op"] for s in ops),
)
def test_whole_image_steps_on_real_images(name: str, ops: list[dict[str, Any]]) -> None:
    path = shared_image(name)
    try:
        image = pyvips.Image.new_from_file(str(path), fail=True)
        if image.width * image.height > 50_000_000:
            pytest.skip(f"{name} declares {image.width}x{image.height}: a bomb, not processed")
        image = image.copy_memory()
    except pyvips.Error as e:
        pytest.skip(f"libvips cannot load {name}: {str(e).splitlines()[0]}")
    if not _compatible(image, ops):
        pytest.skip(f"libvips itself refuses this chain on {name}")
    assert_identical(whole(image, ops), process_tiled(image, ops, tile_size=256))

"""Tiled equals whole: the assembled tiles are libvips' whole-image result, borders included."""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from typing import Any

import pytest
import pyvips
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.support import (
    assert_identical,
    noise_image,
    repository_image_names,
    shared_image,
    shared_image_names,
)
from tilefan import ImageSpec, InvalidChain, check_chain, parse_chain, process_tiled
from tilefan.imaging.operations import Conv, GaussBlur, HistLocal, Median, Sharpen, Sobel

pytestmark = pytest.mark.unit


def whole(image: pyvips.Image, ops: list[dict[str, Any]]) -> pyvips.Image:
    """The chain run by libvips on the whole image: the reference."""
    return reduce(lambda im, step: step.apply(im), parse_chain(ops), image)


POINT = st.one_of(
    st.just({"op": "invert"}),
    st.builds(
        lambda a, b: {"op": "linear", "a": a, "b": b},
        st.floats(-2, 2, allow_nan=False),
        st.floats(-50, 50, allow_nan=False),
    ),
    st.builds(lambda e: {"op": "gamma", "exponent": e}, st.floats(0.2, 3)),
    st.builds(lambda v: {"op": "threshold", "value": v}, st.floats(-100, 300)),
    st.just({"op": "colourspace", "space": "b-w"}),
)
NEIGHBOURHOOD = st.one_of(
    st.builds(
        lambda s, p: {"op": "gaussblur", "sigma": s, "precision": p},
        st.floats(0.3, 6),
        st.sampled_from(["integer", "float"]),
    ),
    st.builds(lambda s: {"op": "sharpen", "sigma": s}, st.floats(0.3, 3)),
    st.builds(lambda n: {"op": "median", "size": n}, st.integers(1, 7)),
    st.just({"op": "sobel"}),
    st.builds(
        lambda w, h, m: {"op": "hist_local", "width": w, "height": h, "max_slope": m},
        st.integers(1, 15),
        st.integers(1, 15),
        st.integers(0, 4),
    ),
    st.builds(
        lambda rows: {"op": "conv", "mask": rows, "scale": max(1.0, sum(map(sum, rows)))},
        st.integers(1, 7).flatmap(
            lambda w: st.lists(
                st.lists(st.integers(-3, 9).map(float), min_size=w, max_size=w),
                min_size=1,
                max_size=7,
            )
        ),
    ),
)
GLOBAL = st.one_of(
    st.just({"op": "hist_equal"}),
    st.builds(lambda log: {"op": "scale", "log": log}, st.booleans()),
)
GEOMETRIC = st.one_of(
    st.builds(lambda a: {"op": "rot", "angle": a}, st.sampled_from(["d90", "d180", "d270"])),
    st.builds(
        lambda d: {"op": "flip", "direction": d}, st.sampled_from(["horizontal", "vertical"])
    ),
    st.builds(
        lambda h, v: {"op": "shrink", "hshrink": h, "vshrink": v},
        st.integers(1, 5),
        st.integers(1, 5),
    ),
)


def _compatible(image: pyvips.Image, ops: list[dict[str, Any]]) -> bool:
    try:
        chain = parse_chain(ops)
        check_chain(chain, ImageSpec.of(image))
        whole(image, ops).avg()
    except (InvalidChain, pyvips.Error):
        return False
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    width=st.integers(1, 900),
    height=st.integers(1, 900),
    bands=st.integers(1, 4),
    fmt=st.sampled_from(["uchar", "char", "ushort", "short", "float"]),
    tile_size=st.integers(64, 300),
    ops=st.lists(
        st.one_of(POINT, NEIGHBOURHOOD, NEIGHBOURHOOD, GEOMETRIC, GLOBAL), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**16),
)
def test_tiled_equals_whole_for_any_size_tile_size_and_chain(
    width: int,
    height: int,
    bands: int,
    fmt: str,
    tile_size: int,
    ops: list[dict[str, Any]],
    seed: int,
) -> None:
    image = noise_image(width, height, bands, fmt, seed)
    assume(_compatible(image, ops))
    assert_identical(whole(image, ops), process_tiled(image, ops, tile_size=tile_size))


CHAINS = [
    [{"op": "gaussblur", "sigma": 3}, {"op": "sharpen"}, {"op": "median", "size": 3}],
    [{"op": "sobel"}, {"op": "gaussblur", "sigma": 1.2}],
    [
        {"op": "rot", "angle": "d90"},
        {"op": "median", "size": 5},
        {"op": "shrink", "hshrink": 2, "vshrink": 3},
    ],
    [
        {"op": "flip", "direction": "horizontal"},
        {"op": "gaussblur", "sigma": 2},
        {"op": "rot", "angle": "d270"},
    ],
    [{"op": "invert"}, {"op": "conv", "mask": [[1, 2, 1], [2, 4, 2], [1, 2, 1]], "scale": 16.0}],
]


@pytest.mark.parametrize("ops", CHAINS, ids=lambda ops: "+".join(s["op"] for s in ops))
@pytest.mark.parametrize("fmt", ["uchar", "char", "ushort", "short", "float"])
@pytest.mark.parametrize("bands", [1, 2, 3, 4])
def test_tiled_equals_whole_for_every_pixel_format(
    ops: list[dict[str, Any]], fmt: str, bands: int
) -> None:
    image = noise_image(211, 157, bands, fmt)
    if not _compatible(image, ops):
        pytest.skip(f"libvips itself refuses this chain on {bands}-band {fmt}")
    result = process_tiled(image, ops, tile_size=64)
    assert_identical(whole(image, ops), result)


def _real_images() -> list[Any]:
    """The images shipped in tests/images (always), then those of ../shared/images."""
    shared = [
        pytest.param(name, marks=pytest.mark.shared_images)
        for name in shared_image_names() or ["(none)"]
    ]
    return [*repository_image_names(), *shared]


@pytest.mark.parametrize("name", _real_images())
@pytest.mark.parametrize("ops", CHAINS[:3], ids=lambda ops: "+".join(s["op"] for s in ops))
def test_tiled_equals_whole_on_real_images(name: str, ops: list[dict[str, Any]]) -> None:
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
    assert_identical(whole(image, ops), process_tiled(image, ops, tile_size=128))


HALO_CASES: list[tuple[type, dict[str, Any]]] = [
    (GaussBlur, {"op": "gaussblur", "sigma": 0.8}),
    (GaussBlur, {"op": "gaussblur", "sigma": 5}),
    (GaussBlur, {"op": "gaussblur", "sigma": 3, "min_ampl": 0.05, "precision": "float"}),
    (Sharpen, {"op": "sharpen"}),
    (Sharpen, {"op": "sharpen", "sigma": 2.5}),
    (Median, {"op": "median", "size": 3}),
    (Median, {"op": "median", "size": 6}),
    (Sobel, {"op": "sobel"}),
    (Conv, {"op": "conv", "mask": [[1.0] * 9] * 9, "scale": 81.0}),
    (HistLocal, {"op": "hist_local", "width": 9, "height": 9}),
    (HistLocal, {"op": "hist_local", "width": 5, "height": 12, "max_slope": 2}),
]


@pytest.mark.parametrize(("cls", "spec"), HALO_CASES, ids=lambda v: str(v))
def test_each_halo_is_tight_one_pixel_less_breaks_exactness(
    cls: type, spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = noise_image(300, 260, 3)
    expected = whole(image, [spec])
    assert_identical(expected, process_tiled(image, [spec], tile_size=64))
    original: Callable[[Any], int] = cls.halo
    monkeypatch.setattr(cls, "halo", lambda self: original(self) - 1)
    with pytest.raises(AssertionError):
        assert_identical(expected, process_tiled(image, [spec], tile_size=64))

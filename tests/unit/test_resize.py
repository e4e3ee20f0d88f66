"""The ``resize`` step: tiled equals libvips' whole-image ``resize``, bit for bit.

libvips computes some parts of ``resize`` (the nearest kernel, upsizing, any kernel on ``double``
pixels) from coordinates it steps within each region, so its whole-image result depends on the
order the image is computed in. The reference here is libvips' strip order: full-width strips
``STRIP_HEIGHT`` rows tall, from the top (what ``Resize.apply`` pins; see docs/resize.md).
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import numpy as np
import pytest
import pyvips
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import assert_identical, noise_image
from tilefan import InvalidChain, Rect, parse_chain, process_tiled
from tilefan.imaging._resize import KERNELS, STRIP_HEIGHT, resize_input_region
from tilefan.imaging.operations import Resize

pytestmark = pytest.mark.unit


def strip_order(image: pyvips.Image) -> pyvips.Image:
    """``image`` computed by libvips in full-width strips from the top, as a memory image."""
    region = pyvips.Region.new(image)
    strips = [
        region.fetch(0, top, image.width, min(STRIP_HEIGHT, image.height - top))
        for top in range(0, image.height, STRIP_HEIGHT)
    ]
    return pyvips.Image.new_from_memory(
        b"".join(strips), image.width, image.height, image.bands, image.format
    )


def libvips_resize(image: pyvips.Image, step: dict[str, Any]) -> pyvips.Image:
    """The reference: libvips' own ``resize`` on the whole image, in strip order."""
    vscale = step.get("vscale") or step["scale"]
    kernel = step.get("kernel", "lanczos3")
    return strip_order(image.resize(step["scale"], vscale=vscale, kernel=kernel))


def whole(image: pyvips.Image, ops: list[dict[str, Any]]) -> pyvips.Image:
    """A chain run by libvips on the whole image, each step as its ``apply`` runs it."""
    return reduce(lambda im, step: step.apply(im), parse_chain(ops), image)


def signed_noise(width: int, height: int, bands: int, fmt: str, seed: int) -> pyvips.Image:
    """Noise that also covers negative values and the ``uint``, ``int`` and ``double`` formats."""
    rng = np.random.default_rng(seed)
    dtypes = {"uint": np.uint32, "int": np.int32, "double": np.float64}
    if fmt not in dtypes:
        return noise_image(width, height, bands, fmt, seed)
    pixels = rng.normal(0.0, 5000.0, (height, width, bands))
    if fmt == "uint":
        pixels = np.abs(pixels)
    return pyvips.Image.new_from_array(pixels.astype(dtypes[fmt]))


# --- the step ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"op": "resize"}, "field 'scale'"),
        ({"op": "resize", "scale": 0}, "field 'scale'"),
        ({"op": "resize", "scale": -0.5}, "field 'scale'"),
        ({"op": "resize", "scale": 16.5}, "field 'scale'"),
        ({"op": "resize", "scale": float("nan")}, "field 'scale'"),
        ({"op": "resize", "scale": 0.5, "vscale": 0}, "field 'vscale'"),
        ({"op": "resize", "scale": 0.5, "vscale": 17}, "field 'vscale'"),
        ({"op": "resize", "scale": 0.5, "kernel": "box"}, "field 'kernel'"),
        ({"op": "resize", "scale": 0.5, "gap": 4}, "gap"),
        ({"op": "resize", "scale": "half"}, "field 'scale'"),
    ],
)
def test_invalid_resize_steps_are_refused_with_the_field(
    step: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidChain) as caught:
        parse_chain([step])
    assert message in str(caught.value)


def test_resize_defaults_and_json_round_trip() -> None:
    chain = parse_chain([{"op": "resize", "scale": 2}])
    assert chain.to_json() == [{"op": "resize", "scale": 2.0, "vscale": None, "kernel": "lanczos3"}]
    assert parse_chain(chain.to_json()) == chain
    assert set(KERNELS) == {"nearest", "linear", "cubic", "mitchell", "lanczos2", "lanczos3"}


@pytest.mark.parametrize(
    ("width", "height", "scale", "vscale", "kernel"),
    [
        (1000, 700, 0.3, None, "lanczos3"),
        (999, 1, 0.1, None, "cubic"),
        (1, 1, 0.01, None, "lanczos3"),
        (1, 1, 16.0, None, "linear"),
        (7, 5, 0.001, 3.3, "nearest"),
        (1500, 3, 1.0 / 3.0, 1.0 / 7.0, "mitchell"),
        (17, 31, 2.5, 0.4, "lanczos2"),
        (640, 480, 0.75, None, "nearest"),
    ],
)
def test_output_size_is_libvips_own_and_never_empty(
    width: int, height: int, scale: float, vscale: float | None, kernel: str
) -> None:
    (step,) = parse_chain([{"op": "resize", "scale": scale, "vscale": vscale, "kernel": kernel}])
    expected = pyvips.Image.black(width, height).resize(
        scale, vscale=vscale if vscale is not None else scale, kernel=kernel
    )
    assert step.output_size(width, height) == (expected.width, expected.height)
    assert min(step.output_size(width, height)) >= 1


def test_the_step_means_libvips_resize() -> None:
    image = noise_image(123, 77, 3)
    for kernel in KERNELS:
        for scale, vscale in [(0.37, 0.37), (2.5, 1.25), (0.2, 3.0), (1.0, 0.5)]:
            step = {"op": "resize", "scale": scale, "vscale": vscale, "kernel": kernel}
            (resize,) = parse_chain([step])
            assert isinstance(resize, Resize)
            assert_identical(libvips_resize(image, step), resize.apply(image))


# --- tiled equals whole ------------------------------------------------------------------------


def _scales(size: int) -> st.SearchStrategy[float]:
    """Down to a few pixels and up to about 1600 pixels along an axis of ``size`` pixels."""
    top = max(1.0, min(16.0, 1600.0 / size))
    nice = [0.1, 0.25, 0.3, 0.4, 0.45, 0.5, 0.7, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
    return st.one_of(
        st.floats(2.0 / size, 1.0) if size > 2 else st.just(1.0),
        st.floats(1.0, top),
        st.sampled_from([s for s in nice if s <= top]),
        st.integers(2, 12).map(lambda n: 1.0 / n),
    )


@settings(max_examples=45, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    width=st.integers(1, 1500),
    height=st.integers(1, 1500),
    bands=st.sampled_from([1, 3]),
    fmt=st.sampled_from(["uchar", "char", "ushort", "short", "float", "double"]),
    kernel=st.sampled_from(KERNELS),
    tile_size=st.integers(64, 300),
    seed=st.integers(0, 2**16),
)
def test_tiled_resize_equals_libvips_for_any_size_scale_kernel_and_tile(
    data: st.DataObject,
    width: int,
    height: int,
    bands: int,
    fmt: str,
    kernel: str,
    tile_size: int,
    seed: int,
) -> None:
    scale = data.draw(_scales(width), label="scale")
    vscale = data.draw(st.one_of(st.none(), _scales(height)), label="vscale")
    step = {"op": "resize", "scale": scale, "vscale": vscale, "kernel": kernel}
    image = signed_noise(width, height, bands, fmt, seed)
    assert_identical(libvips_resize(image, step), process_tiled(image, [step], tile_size=tile_size))


# Scales whose libvips sample positions land exactly on quantisation and pixel boundaries, where
# a coordinate off by one unit in the last place picks another pixel or coefficient.
EXACT_BOUNDARY_CASES = [
    (kernel, scale, vscale)
    for kernel in KERNELS
    for scale, vscale in [
        (2.5, 2.5),
        (1.25, 3.0),
        (3.0, 0.2),
        (0.2, 3.0),
        (0.3, 0.3),
        (1.0 / 7.0, 0.45),
        (1.2, 1.0),
        (1.0, 1.4),
        (384.0 / 101.0, 1.0),
    ]
]


@pytest.mark.parametrize(("kernel", "scale", "vscale"), EXACT_BOUNDARY_CASES)
@pytest.mark.parametrize("fmt", ["uchar", "short", "float", "double"])
def test_tiled_resize_is_exact_where_libvips_coordinates_hit_boundaries(
    kernel: str, scale: float, vscale: float, fmt: str
) -> None:
    image = signed_noise(303, 211, 3 if fmt == "uchar" else 1, fmt, seed=7)
    step = {"op": "resize", "scale": scale, "vscale": vscale, "kernel": kernel}
    assert_identical(libvips_resize(image, step), process_tiled(image, [step], tile_size=97))


@pytest.mark.parametrize(
    ("width", "height", "step"),
    [
        (4000, 20, {"op": "resize", "scale": 2.5, "vscale": 1.5, "kernel": "linear"}),
        (4000, 20, {"op": "resize", "scale": 3.0, "vscale": 1.0, "kernel": "cubic"}),
        (9000, 12, {"op": "resize", "scale": 0.3, "vscale": 1.0, "kernel": "nearest"}),
        (12, 6000, {"op": "resize", "scale": 1.0, "vscale": 1.0 / 7.0, "kernel": "nearest"}),
    ],
)
def test_long_rows_and_columns_keep_libvips_stepped_coordinates(
    width: int, height: int, step: dict[str, Any]
) -> None:
    image = noise_image(width, height, 1, "float", seed=3)
    assert_identical(libvips_resize(image, step), process_tiled(image, [step], tile_size=64))


def test_nearest_keeps_libvips_rounding_of_negative_signed_values() -> None:
    # libvips' one-point reduce moves negative values of signed formats one step down.
    for fmt in ["char", "short", "int"]:
        image = signed_noise(301, 199, 1, fmt, seed=5)
        for scale, vscale in [(0.3, 0.3), (1.0, 0.45), (0.45, 1.0), (1.0 / 6.0, 2.5)]:
            step = {"op": "resize", "scale": scale, "vscale": vscale, "kernel": "nearest"}
            expected = libvips_resize(image, step)
            assert_identical(expected, process_tiled(image, [step], tile_size=64))


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "gaussblur", "sigma": 1.5}, {"op": "resize", "scale": 2.5, "kernel": "linear"}],
        [{"op": "resize", "scale": 0.3, "kernel": "nearest"}, {"op": "rot", "angle": "d90"}],
        [
            {"op": "rot", "angle": "d270"},
            {"op": "resize", "scale": 1.7, "vscale": 0.3, "kernel": "cubic"},
            {"op": "sobel"},
        ],
        [
            {"op": "resize", "scale": 0.45, "kernel": "lanczos3"},
            {"op": "median", "size": 3},
            {"op": "resize", "scale": 3.0, "kernel": "mitchell"},
        ],
    ],
)
def test_resize_in_chains_equals_the_whole_chain(ops: list[dict[str, Any]]) -> None:
    image = noise_image(257, 181, 3)
    assert_identical(whole(image, ops), process_tiled(image, ops, tile_size=80))


def test_libvips_resize_depends_on_evaluation_order_so_the_step_pins_it() -> None:
    # After a small-tile step libvips computes resize in 128 x 128 tiles and gets other pixels
    # than in strips. If a libvips release stops doing that, this fails and the pin can go.
    image = noise_image(300, 200, 1, "ushort").gaussblur(1.0)
    step = {"op": "resize", "scale": 2.5, "kernel": "linear"}
    reference = libvips_resize(image, step)
    in_tiles = image.resize(2.5, kernel="linear").copy_memory()
    assert not np.array_equal(reference.numpy(), in_tiles.numpy())
    (resize,) = parse_chain([step])
    assert_identical(reference, resize.apply(image).copy_memory())


# --- the input rectangle -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("scale", "vscale"), [(0.3, 0.3), (0.05, 0.7), (2.5, 2.5), (1.7, 0.2), (0.45, 3.0), (1.0, 0.5)]
)
def test_input_region_holds_every_pixel_libvips_reads(
    kernel: str, scale: float, vscale: float
) -> None:
    # Change every pixel outside the input region of one output rectangle: libvips' own result
    # inside that rectangle must not move.
    width, height = 211, 173
    image = noise_image(width, height, 1, "float", seed=11)
    step = {"op": "resize", "scale": scale, "vscale": vscale, "kernel": kernel}
    reference = libvips_resize(image, step).numpy()
    out_h, out_w = reference.shape[:2]
    for out in [
        Rect(0, 0, min(40, out_w), min(40, out_h)),
        Rect(out_w // 3, out_h // 3, max(1, out_w // 4), max(1, out_h // 4)),
        Rect(max(0, out_w - 30), max(0, out_h - 30), min(30, out_w), min(30, out_h)),
    ]:
        needed = resize_input_region(out, width, height, scale, vscale, kernel).clip(width, height)
        pixels = image.numpy().copy()
        keep = np.zeros(pixels.shape[:2], dtype=bool)
        keep[needed.y : needed.bottom, needed.x : needed.right] = True
        pixels[~keep] = 1.0e6
        poisoned = libvips_resize(pyvips.Image.new_from_array(pixels), step).numpy()
        rows, columns = slice(out.y, out.bottom), slice(out.x, out.right)
        assert np.array_equal(poisoned[rows, columns], reference[rows, columns]), out

"""Operation chains: libvips' names and parameters, and a clear message for each bad step."""

from __future__ import annotations

import pytest
import pyvips

from tests.support import assert_identical, noise_image
from tilefan import InvalidChain, OpKind, operation_names, parse_chain
from tilefan.imaging.operations import MAX_CONV_MASK

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"op": "blur"}], "step 0, field 'op': unknown operation 'blur'; valid operations are"),
        (
            [{"op": "invert"}, {"op": "gaussblur"}],
            "step 1 (gaussblur), field 'sigma': Field required",
        ),
        ([{"op": "gaussblur", "sigma": "4"}], "field 'sigma': Input should be a valid number"),
        (
            [{"op": "gaussblur", "sigma": -1}],
            "field 'sigma': Input should be greater than or equal to 0.01",
        ),
        ([{"op": "gaussblur", "sigma": 4, "radius": 2}], "field 'radius': Extra inputs"),
        ([{"op": "median", "size": 2.5}], "step 0 (median), field 'size'"),
        ([{"op": "rot", "angle": "d45"}], "field 'angle': Input should be 'd90', 'd180' or 'd270'"),
        ([{"op": "conv", "mask": [[1, 2], [3]]}], "mask rows must all have the same length"),
        ([{"op": "conv", "mask": [[1] * 16]}], f"1 to {MAX_CONV_MASK} values"),
        ([{"op": "conv", "mask": [[1]] * 16}], "field 'mask'"),
        ([{"op": "shrink", "hshrink": 0, "vshrink": 2}], "field 'hshrink'"),
        ({"op": "invert"}, "operations must be a list"),
        (["invert"], "step 0: each step must be an object with an 'op' field"),
        ([{"op": "invert"}] * 33, "at most 32 steps"),
    ],
)
def test_bad_step_is_rejected_with_its_own_message(steps: object, message: str) -> None:
    with pytest.raises(InvalidChain) as caught:
        parse_chain(steps)
    assert message in str(caught.value)


def test_unknown_operation_lists_every_valid_one() -> None:
    with pytest.raises(InvalidChain) as caught:
        parse_chain([{"op": "nope"}])
    for name in operation_names():
        assert name in str(caught.value)


def test_chain_round_trips_through_json_with_defaults_filled() -> None:
    chain = parse_chain([{"op": "gaussblur", "sigma": 4}, {"op": "rot", "angle": "d90"}])
    assert chain.to_json() == [
        {"op": "gaussblur", "sigma": 4.0, "min_ampl": 0.2, "precision": "integer"},
        {"op": "rot", "angle": "d90"},
    ]
    assert parse_chain(chain.to_json()) == chain


def test_every_step_declares_its_kind() -> None:
    chain = parse_chain(
        [{"op": "invert"}, {"op": "median", "size": 5}, {"op": "flip", "direction": "vertical"}]
    )
    assert [step.kind for step in chain] == [OpKind.POINT, OpKind.NEIGHBOURHOOD, OpKind.GEOMETRIC]


def test_gaussblur_halo_is_libvips_own_mask_radius() -> None:
    (step,) = parse_chain([{"op": "gaussblur", "sigma": 4, "min_ampl": 0.05}])
    mask = pyvips.Image.gaussmat(4, 0.05, separable=True, precision="integer")
    assert step.halo() == mask.width // 2


def test_steps_mean_what_libvips_means() -> None:
    image = noise_image(60, 40)
    cases = [
        ({"op": "gaussblur", "sigma": 4}, image.gaussblur(4)),
        ({"op": "linear", "a": 2, "b": 1}, image.linear(2, 1)),
        ({"op": "median", "size": 5}, image.median(5)),
        ({"op": "rot", "angle": "d90"}, image.rot("d90")),
        ({"op": "shrink", "hshrink": 2, "vshrink": 3}, image.shrink(2, 3)),
        ({"op": "sharpen", "sigma": 1.5, "m2": 4}, image.sharpen(sigma=1.5, m2=4)),
        ({"op": "threshold", "value": 100}, image >= 100),
    ]
    for spec, expected in cases:
        (step,) = parse_chain([spec])
        assert_identical(expected, step.apply(image))

"""Limits that refuse a job before it does the work: bands and output pixels."""

from __future__ import annotations

import pytest
import pyvips

import tilefan.stages.split
from tilefan.errors import InvalidChain, TooManyPixels
from tilefan.imaging.operations import MAX_BANDS, parse_chain
from tilefan.imaging.plan import ImageSpec, check_chain

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("field", ["a", "b"])
def test_a_linear_with_thousands_of_coefficients_is_refused_when_validated(field: str) -> None:
    # It once made a 20,000-band image: 3 minutes and 1.2 GB before INTERNAL_ERROR.
    with pytest.raises(InvalidChain, match=rf"step 0 \(linear\).*{field} has 20,000 coeff"):
        parse_chain([{"op": "linear", field: [1.0] * 20_000}])


def test_a_linear_with_one_coefficient_per_band_of_a_wide_image_is_accepted() -> None:
    parse_chain([{"op": "linear", "a": [1.0] * MAX_BANDS, "b": 0}])


def test_a_chain_on_an_image_with_too_many_bands_is_refused_before_the_tiles() -> None:
    spec = ImageSpec(
        width=100, height=100, bands=MAX_BANDS + 1, format="uchar", interpretation="multiband"
    )
    with pytest.raises(InvalidChain, match=f"{MAX_BANDS + 1}-band image"):
        check_chain(parse_chain([{"op": "invert"}]), spec)


def test_an_upscaling_chain_whose_output_is_too_large_is_refused_from_the_header() -> None:
    header = pyvips.Image.black(1000, 800)
    chain = parse_chain([{"op": "resize", "scale": 4}])
    with pytest.raises(TooManyPixels, match="4000x3200 = 12,800,000-pixel output"):
        tilefan.stages.split._check_output_size(chain, header, max_pixels=10_000_000)
    tilefan.stages.split._check_output_size(chain, header, max_pixels=12_800_000)


def test_the_splitter_checks_the_output_before_it_decodes() -> None:
    import inspect

    source = inspect.getsource(tilefan.stages.split.split)
    assert source.index("_check_output_size(") < source.index("transcode(")

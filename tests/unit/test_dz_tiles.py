"""The DeepZoom and IIIF arithmetic, against libvips' dzsave of the same whole image."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import pyvips
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import assert_identical, noise_image
from tilefan.formats.dz_tiles import InvalidTileSet, TileSetLayout, halve_padded
from tilefan.imaging.geometry import Rect
from tilefan.stages.tileset_output import worker_levels

pytestmark = pytest.mark.unit


def whole_set(image: pyvips.Image, layout: TileSetLayout) -> dict[str, bytes]:
    """Every tile, by dzsave's name, made with the layout's arithmetic from the whole image."""
    level = layout.saveable(image)
    sizes = layout.level_sizes(image.width, image.height)
    tiles = {}
    for number, (width, height) in enumerate(sizes):
        assert (level.width, level.height) == (width, height)
        for column, row, rect in layout.tiles(width, height, Rect(0, 0, width, height)):
            name = layout.tile_name(sizes, number, column, row)
            tiles[name] = layout.encode(level.crop(*rect))
        if number + 1 < len(sizes):
            level = halve_padded(level)
    return tiles


def dzsave_zip(image: pyvips.Image, layout: TileSetLayout, tmp_path: Path) -> dict[str, bytes]:
    path = tmp_path / "whole.zip"
    image.dzsave(str(path), **layout.dzsave_arguments())
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def tiles_of(files: dict[str, bytes], root: str) -> dict[str, bytes]:
    return {
        name.removeprefix(root): data
        for name, data in files.items()
        if name.startswith(root) and not name.endswith((".xml", ".json"))
    }


@pytest.mark.parametrize("iiif", [False, True])
@pytest.mark.parametrize("bands", [1, 3, 4])
@pytest.mark.parametrize(("width", "height"), [(37, 19), (255, 256), (601, 303), (1021, 515)])
def test_the_pyramid_and_its_tiles_equal_dzsave_byte_for_byte(
    tmp_path: Path, iiif: bool, bands: int, width: int, height: int
) -> None:
    image = noise_image(width, height, bands, seed=width + bands)
    layout = TileSetLayout.from_options("iiif" if iiif else "dzi", {})
    expected = dzsave_zip(image, layout, tmp_path)
    root = "whole/" if iiif else "whole_files/"
    assert whole_set(image, layout) == tiles_of(expected, root)


@settings(max_examples=15, deadline=None)
@given(
    width=st.integers(1, 600),
    height=st.integers(1, 600),
    tile_size=st.sampled_from([16, 62, 254, 256]),
    overlap=st.integers(0, 3),
    suffix=st.sampled_from(["jpeg", "png"]),
)
def test_any_size_tile_size_and_overlap_decode_as_dzsave_does(
    tmp_path_factory: pytest.TempPathFactory,
    width: int,
    height: int,
    tile_size: int,
    overlap: int,
    suffix: str,
) -> None:
    options = {"tile_size": tile_size, "overlap": min(overlap, tile_size // 2), "suffix": suffix}
    layout = TileSetLayout.from_options("dzi", options)
    image = noise_image(width, height, 3, seed=width * height)
    expected = tiles_of(dzsave_zip(image, layout, tmp_path_factory.mktemp("z")), "whole_files/")
    got = whole_set(image, layout)
    assert sorted(got) == sorted(expected)
    for name, data in expected.items():
        assert_identical(
            pyvips.Image.new_from_buffer(data, ""), pyvips.Image.new_from_buffer(got[name], "")
        )


@pytest.mark.parametrize("output_format", ["dzi", "iiif"])
def test_the_descriptor_is_dzsaves(tmp_path: Path, output_format: str) -> None:
    image = noise_image(700, 301, 3, seed=1)
    layout = TileSetLayout.from_options(output_format, {"quality": 80})
    image.dzsave(str(tmp_path / "result"), **layout.dzsave_arguments())
    written = tmp_path / ("result/info.json" if layout.iiif else "result.dzi")
    assert layout.descriptor(700, 301, "result") == written.read_bytes()


def test_a_block_on_even_coordinates_halves_as_its_part_of_the_level() -> None:
    image = noise_image(333, 211, 3, seed=4)
    level = halve_padded(image)
    for x, y, w, h in [(0, 0, 128, 128), (128, 64, 128, 128), (256, 128, 77, 83)]:
        part = halve_padded(image.crop(x, y, w, h))
        assert_identical(level.crop(x // 2, y // 2, part.width, part.height), part)


def test_workers_hold_the_levels_where_a_block_is_whole_tiles() -> None:
    assert worker_levels(254, 254, 12) == 1
    assert worker_levels(1016, 254, 12) == 3
    assert worker_levels(2048, 512, 2) == 2  # a small image has fewer levels than that


@pytest.mark.parametrize(
    ("output_format", "options", "match"),
    [
        ("dzi", {"tile_size": 255}, "even tile size"),
        ("dzi", {"tile_size": 64, "overlap": 33}, "overlap must be from 0 to 32"),
        ("iiif", {"overlap": 1}, "IIIF tiles have no overlap"),
        ("dz", {"suffix": "gif"}, "suffix must be one of"),
    ],
)
def test_options_a_set_cannot_be_written_with_are_refused_with_a_code(
    output_format: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidTileSet, match=match) as raised:
        TileSetLayout.from_options(output_format, options)
    assert raised.value.code == "INVALID_TILE_SET"


def test_jpeg_tiles_refuse_a_result_that_is_not_8_bit() -> None:
    layout = TileSetLayout.from_options("dzi", {})
    with pytest.raises(InvalidTileSet, match="8-bit"):
        layout.check_result("ushort")
    TileSetLayout.from_options("dzi", {"suffix": "png"}).check_result("ushort")

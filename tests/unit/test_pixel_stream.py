"""Rows of raw tiles read by libvips as one image, in one pass, for every layout tiles carry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pyvips

import tilefan.formats.pixel_stream
from tests.support import assert_identical, noise_image
from tilefan.errors import TilefanError, UnsupportedImage
from tilefan.formats.pixel_stream import RowStream, TileRow

pytestmark = pytest.mark.unit


def tile_rows(image: pyvips.Image, tile: int) -> Iterator[TileRow]:
    for top in range(0, image.height, tile):
        height = min(tile, image.height - top)
        yield [
            (width, image.crop(left, top, width, height).write_to_memory())
            for left in range(0, image.width, tile)
            for width in [min(tile, image.width - left)]
        ]


def stream_of(image: pyvips.Image, tile: int) -> RowStream:
    return RowStream(
        tile_rows(image, tile),
        width=image.width,
        height=image.height,
        bands=image.bands,
        pixel_format=image.format,
        tile_height=tile,
    )


def layout(width: int, height: int, bands: int, fmt: str) -> pyvips.Image:
    if fmt in ("uint", "int"):
        return (noise_image(width, height, bands, "ushort", seed=bands) * 40_000 - 2**30).cast(fmt)
    return noise_image(width, height, bands, fmt, seed=bands)


@pytest.mark.parametrize("fmt", ["uchar", "char", "ushort", "short", "uint", "int", "float"])
@pytest.mark.parametrize("bands", [1, 2, 3, 4, 5])
def test_every_layout_reads_back_as_it_was(fmt: str, bands: int) -> None:
    image = layout(157, 93, bands, fmt)
    stream = stream_of(image, 40)
    assert_identical(image, stream.image())
    assert stream.guard.error is None


@pytest.mark.parametrize("tile", [16, 64, 93, 200])
def test_strips_across_tile_rows_and_edge_tiles_read_whole(tile: int) -> None:
    image = noise_image(301, 211, 3, seed=tile)
    assert_identical(image, stream_of(image, tile).image())


def test_bigtiff_when_the_file_passes_four_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tilefan.formats.pixel_stream, "_CLASSIC_LIMIT", 1000)
    image = noise_image(120, 80, 3, seed=1)
    stream = stream_of(image, 32)
    assert stream.read(4) == b"II+\x00"
    stream.seek(0, 0)
    assert_identical(image, stream.image())


def test_the_stream_is_read_once_in_order() -> None:
    image = noise_image(200, 300, 3, seed=2)
    rows = tile_rows(image, 50)
    taken: list[int] = []

    def counted() -> Iterator[TileRow]:
        for number, row in enumerate(rows):
            taken.append(number)
            yield row

    stream = RowStream(
        counted(), width=200, height=300, bands=3, pixel_format="uchar", tile_height=50
    )
    stream.image().pngsave_buffer()
    assert taken == list(range(6))


def test_a_read_behind_the_current_row_is_refused() -> None:
    image = noise_image(64, 64, 1, seed=3)
    stream = stream_of(image, 16)
    header = stream.size - 64 * 64
    stream.seek(header + 64 * 40, 0)
    stream.read(64)
    stream.seek(header, 0)
    with pytest.raises(TilefanError, match="read line 0 after line 32"):
        stream.read(64)


def test_a_failing_row_fails_the_encoder_and_is_kept() -> None:
    image = noise_image(100, 100, 3, seed=4)

    def rows() -> Iterator[TileRow]:
        yield next(tile_rows(image, 50))
        raise OSError("the tile went away")

    stream = RowStream(rows(), width=100, height=100, bands=3, pixel_format="uchar", tile_height=50)
    with pytest.raises(pyvips.Error):
        stream.image().jpegsave_buffer()
    assert isinstance(stream.guard.error, OSError)


def test_double_pixels_are_refused_with_a_reason() -> None:
    # libvips' TIFF reader refuses 64-bit samples ("samples out of range").
    with pytest.raises(UnsupportedImage, match="double"):
        RowStream(iter(()), width=4, height=4, bands=1, pixel_format="double", tile_height=4)

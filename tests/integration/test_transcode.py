"""The splitter's intermediate: an upload that decodes only from the top, transcoded into a
tiled BigTIFF the workers read by range. 8- and 16-bit pixels are compressed by the splitter
itself, in threads; the file must read back as the upload, in libvips and in tifffile, with
the tags libvips' own ``tiffsave`` would write."""

from __future__ import annotations

import io

import numpy as np
import pytest
import pyvips
import tifffile

from tests.support import assert_identical, noise_image
from tilefan.formats import tiff_tiles, tiled
from tilefan.state.ranged import PART_SIZE
from tilefan.state.storage import TileStore

pytestmark = pytest.mark.integration

_FIELDS = ("xres", "yres", "resolution-unit", "orientation", "icc-profile-data", "xmp-data")
"""Metadata the intermediate carries to the workers, and on to the result."""


def _transcoded(store: TileStore, upload: bytes) -> bytes:
    """The intermediate of ``upload``, opened and transcoded as the splitter does."""
    store.put_bytes("upload", upload)
    header, origin = tiled.open_object(store, "upload", name="upload", access="sequential")
    size = tiled.transcode(header, origin, store, "source.tif", 256)
    body = store.get_bytes("source.tif")
    assert len(body) == size
    return body


def _metadata(image: pyvips.Image) -> dict[str, object]:
    return {name: image.get(name) for name in _FIELDS if image.get_typeof(name)}


def _with_metadata(image: pyvips.Image) -> pyvips.Image:
    image = image.copy(xres=4.5, yres=2.25)
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)
    if image.bands == 3 and image.format == "uchar":
        profile = pyvips.Image.profile_load("srgb")
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    return image


@pytest.mark.parametrize(
    ("width", "height", "bands", "fmt"),
    [
        (1000, 700, 3, "uchar"),  # edge tiles right and below
        (700, 530, 4, "uchar"),
        (600, 300, 2, "char"),
        (900, 400, 3, "ushort"),
        (513, 257, 1, "short"),
    ],
)
def test_an_intermediate_the_splitter_compresses_reads_back_as_its_upload(
    store: TileStore,
    monkeypatch: pytest.MonkeyPatch,
    width: int,
    height: int,
    bands: int,
    fmt: str,
) -> None:
    # A row of tiles of at most 64 KiB: tiles shorter than wide, as a wide image's are.
    monkeypatch.setattr(tiled, "TILE_ROW_BYTES", 2**16)
    compressed = []
    real = tiff_tiles.deflate.zlib_compress

    def counted(data: object, level: int) -> bytes:
        compressed.append(level)
        return real(data, level)

    monkeypatch.setattr(tiff_tiles.deflate, "zlib_compress", counted)
    image = _with_metadata(noise_image(width, height, bands, fmt=fmt, seed=width))
    upload = image.tiffsave_buffer()  # a strip TIFF: read from the top only
    body = _transcoded(store, upload)

    back = pyvips.Image.new_from_buffer(body, "")
    assert_identical(image, back)
    libvips_tiled = pyvips.Image.new_from_buffer(upload, "").tiffsave_buffer(tile=True)
    assert _metadata(back) == _metadata(pyvips.Image.new_from_buffer(libvips_tiled, ""))
    assert _metadata(back)["orientation"] == 6
    with tifffile.TiffFile(io.BytesIO(body)) as tiff:
        page = tiff.pages[0]
        assert tiff.is_bigtiff
        assert page.tilelength < page.tilewidth == 256  # the row-of-tiles bound chose it
        assert page.predictor == 2
        assert np.array_equal(
            tiff.asarray().reshape(height, width, bands),
            image.numpy().reshape(height, width, bands),
        )
    tiles = -(-width // 256) * -(-height // page.tilelength)
    assert compressed == [1] * tiles  # every tile by the splitter, at the transcode's level


def test_a_jpeg_of_several_parts_transcodes_to_its_decoded_pixels(store: TileStore) -> None:
    """Read top to bottom as the splitter reads an upload, and larger than the multipart
    upload's first part, which holds the header written last."""
    upload = noise_image(2600, 1800, 3, seed=7).jpegsave_buffer(Q=95)
    body = _transcoded(store, upload)
    assert len(body) > PART_SIZE
    assert_identical(
        pyvips.Image.new_from_buffer(upload, ""), pyvips.Image.new_from_buffer(body, "")
    )


def test_other_pixel_formats_are_still_written_by_libvips(store: TileStore) -> None:
    image = noise_image(300, 200, 3, fmt="float")
    body = _transcoded(store, image.tiffsave_buffer())
    assert_identical(image, pyvips.Image.new_from_buffer(body, ""))
    with tifffile.TiffFile(io.BytesIO(body)) as tiff:
        assert tiff.is_bigtiff and tiff.pages[0].is_tiled

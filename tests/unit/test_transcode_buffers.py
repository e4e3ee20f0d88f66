"""The transcode holds two rows of TIFF tiles and a few rows of pixels of the image's width.

What libvips allocates for its pixels (its own count, ``vips_tracked_get_mem_highwater``) and
the most the transcode's own rows of tiles (numpy arrays, followed until freed) held at once
are measured in a fresh process per width, transcoding a JPEG through the splitter's own
`transcode` into a stub S3 that drops the parts; the growth from a narrow to a wide image,
divided by the extra width, is the number of rows of the image held. With libvips'
``tiffsave`` writing, it was 1,184 with libvips' default buffers and 432 with `thin_strips`
(the writer's row of 256 px tiles, the loader's line cache of 64 rows, the sink's buffers).
The transcode now compresses one row of tiles while the next decodes: it holds two rows of
tiles, and libvips only its loader's few rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pyvips

from tilefan.formats import strips
from tilefan.formats.strips import STREAMING_TILE_HEIGHT
from tilefan.formats.tiled import transcode_tile_height

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

EDGE = 256
"""The intermediate's TIFF tile edge: the writer holds this many rows, whatever is done."""

_CHILD = """
import io, json, sys, weakref
sys.path.insert(0, sys.argv[1])
import pyvips
pyvips.cache_set_max(0)
from tilefan.formats.strips import _libvips
from tilefan.formats import tiled
from tilefan.formats.tiled import open_object, transcode
from tilefan.state.storage import TileStore

rows_of_tiles = {"live": 0, "most": 0}
compress = tiled.deflate_tiles

def freed(size):
    rows_of_tiles["live"] -= size

def followed(pixels, *args):
    rows_of_tiles["live"] += pixels.nbytes
    rows_of_tiles["most"] = max(rows_of_tiles["most"], rows_of_tiles["live"])
    weakref.finalize(pixels, freed, pixels.nbytes)
    return compress(pixels, *args)

tiled.deflate_tiles = followed

body = open(sys.argv[2], "rb").read()

class Stub:
    def head_object(self, **_):
        return {"ContentLength": len(body)}
    def get_object(self, Range, **_):
        start, end = (int(v) for v in Range.split("=")[1].split("-"))
        return {"Body": io.BytesIO(body[start:end + 1])}
    def create_multipart_upload(self, **_):
        return {"UploadId": "stub"}
    def upload_part(self, PartNumber, **_):
        return {"ETag": str(PartNumber)}
    def complete_multipart_upload(self, **_):
        return {}

store = TileStore("stub", client=Stub())
lib = _libvips()
lib.vips_tracked_get_mem_highwater.restype = __import__("ctypes").c_size_t
before = lib.vips_tracked_get_mem_highwater()
header, origin = open_object(store, "upload", name="upload", access="sequential")
transcode(header, origin, store, "source.tif", int(sys.argv[3]))
held = lib.vips_tracked_get_mem_highwater() - before + rows_of_tiles["most"]
print(json.dumps({"pixels_bytes": held}))
"""


def _held(width: int, folder: Path) -> int:
    """Bytes libvips and Python allocated at most while transcoding a JPEG ``width`` wide,
    640 high."""
    path = folder / f"{width}.jpg"
    xyz = pyvips.Image.xyz(width, 640)
    pattern = ((xyz[0] * 3 + xyz[1] * 7) % 251).cast("uchar")
    pattern.bandjoin([(xyz[0] % 253).cast("uchar"), (xyz[1] % 241).cast("uchar")]).jpegsave(
        str(path)
    )
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(path), str(EDGE)],
        # The splitter's Lambda environment, where libvips' strip height may be changed.
        env={**os.environ, "AWS_LAMBDA_FUNCTION_NAME": "Splitter"},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["pixels_bytes"])


def test_transcode_holds_two_rows_of_tiles_and_a_few_rows_of_the_width(tmp_path: Path) -> None:
    narrow, wide = 2_000, 12_000
    rows = (_held(wide, tmp_path) - _held(narrow, tmp_path)) / ((wide - narrow) * 3)
    # Measured 502: the two rows of tiles, and about nothing of libvips' that grows with the
    # width (432 with libvips' tiffsave writing, 1,184 with its default buffers).
    assert rows <= 2 * EDGE + 12 * STREAMING_TILE_HEIGHT, rows
    assert rows >= EDGE, rows  # measured at all: the rows of tiles are in it


def test_overlapping_transcodes_set_thin_strips_once_and_the_last_restores_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given: list[tuple[str, ...]] = []
    monkeypatch.setattr(strips, "_parse_vips_options", lambda *options: given.append(options))
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "Splitter")
    with strips.thin_strips():
        with strips.thin_strips():
            pass
        assert len(given) == 1
        assert f"--vips-tile-height={STREAMING_TILE_HEIGHT}" in given[0]
    assert given[1:] == [strips._DEFAULTS]


@pytest.mark.parametrize(
    ("width", "bands", "pixel_format", "edge", "height"),
    [
        (10_000, 3, "uchar", 256, 256),  # the 100 MP square: a row of tiles is 7.7 MB
        (44_721, 3, "uchar", 256, 64),  # the 2 GP square: 128 rows would be 17 MB
        (44_721, 3, "ushort", 256, 32),
        (44_721, 3, "uchar", 64, 64),  # never taller than the plan allows
        (2_000_000, 4, "float", 256, 16),  # TIFF's least: 16 rows, whatever they weigh
    ],
)
def test_a_wide_image_gets_shorter_tiles_so_a_row_of_them_stays_within_its_budget(
    width: int, bands: int, pixel_format: str, edge: int, height: int
) -> None:
    image = pyvips.Image.black(width, 1, bands=bands).cast(pixel_format)
    got = transcode_tile_height(edge, image)
    assert got == height
    assert edge % got == 0  # the tiles still divide the plan's


def test_outside_a_lambda_environment_libvips_settings_are_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other threads may be running libvips there: a pipeline breaks if they change under it."""
    given: list[tuple[str, ...]] = []
    monkeypatch.setattr(strips, "_parse_vips_options", lambda *options: given.append(options))
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    with strips.thin_strips():
        pass
    assert given == []

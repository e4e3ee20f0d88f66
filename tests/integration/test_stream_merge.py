"""The streaming merge of jpeg, png and webp: output tiles from S3 (moto) to a multipart upload.

The reference is libvips' own saver on the whole image: the same encoder given the same pixels
in the same order writes the same bytes, so the results are compared byte for byte.
"""

from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pyvips

import tilefan.stages.stream_merge
import tilefan.state.multipart
from tests.support import noise_image, shared_image
from tilefan.errors import TransientError
from tilefan.formats.source import upright
from tilefan.imaging.operations import parse_chain
from tilefan.imaging.plan import ImageSpec, TilePlan, plan_tiles
from tilefan.imaging.synthetic import synthetic_image
from tilefan.stages.stream_merge import merge_streamed
from tilefan.state.storage import ObjectMissing, TileStore, keys

pytestmark = pytest.mark.integration

JOB = "job-1"
SAVERS = {
    "jpeg": ("jpegsave_buffer", {"Q": 90}),
    "png": ("pngsave_buffer", {}),
    "webp": ("webpsave_buffer", {"Q": 90}),
}


def put_output_tiles(store: TileStore, image: pyvips.Image, tile_size: int) -> TilePlan:
    """Store ``image`` as the workers would store it as a job's output tiles."""
    plan = plan_tiles(ImageSpec.of(image), parse_chain([]), tile_size)
    for tile in plan.tiles():
        store.put_tile(JOB, "out", tile.index, image.crop(*tile.output), metadata=tile.index == 0)
    return plan


def streamed(
    store: TileStore, plan: TilePlan, image: pyvips.Image, fmt: str, options: dict[str, Any]
) -> tuple[dict[str, Any], bytes]:
    pipeline: Any = SimpleNamespace(store=store)
    output = merge_streamed(pipeline, JOB, plan, image.interpretation, fmt, options)
    body = store.client.get_object(Bucket=store.bucket, Key=output["key"])["Body"].read()
    return output, body


def reference(image: pyvips.Image, fmt: str) -> bytes:
    """libvips' saver on the whole image, with the metadata a stored tile carries."""
    saver, options = SAVERS[fmt]
    as_stored = pyvips.Image.new_from_buffer(image.tiffsave_buffer(predictor="none"), "")
    return bytes(getattr(as_stored.copy(interpretation=image.interpretation), saver)(**options))


@pytest.mark.parametrize("fmt", list(SAVERS))
@pytest.mark.parametrize(
    ("width", "height", "bands", "tile_size"),
    [
        (300, 200, 3, 64),  # edge tiles on both sides
        (256, 192, 3, 128),  # tiles that divide the image
        (333, 251, 1, 100),
        (250, 170, 4, 96),
    ],
)
def test_streamed_result_is_byte_identical_to_whole_image_libvips(
    store: TileStore, fmt: str, width: int, height: int, bands: int, tile_size: int
) -> None:
    image = noise_image(width, height, bands, seed=width + bands)
    plan = put_output_tiles(store, image, tile_size)
    output, body = streamed(store, plan, image, fmt, {})
    assert body == reference(image, fmt)
    assert (output["width"], output["height"], output["size_bytes"]) == (width, height, len(body))


@pytest.mark.parametrize("fmt", list(SAVERS))
def test_a_shared_image_streams_byte_identical(store: TileStore, fmt: str) -> None:
    image = upright(pyvips.Image.new_from_file(str(shared_image("sample.jpg")))).copy_memory()
    plan = put_output_tiles(store, image, 128)
    _, body = streamed(store, plan, image, fmt, {})
    assert body == reference(image, fmt)


def test_sixteen_bit_png_streams_byte_identical(store: TileStore) -> None:
    image = noise_image(200, 150, 3, "ushort", seed=3)
    plan = put_output_tiles(store, image, 64)
    _, body = streamed(store, plan, image, "png", {})
    assert body == reference(image, "png")
    assert pyvips.Image.new_from_buffer(body, "").format == "ushort"


@pytest.mark.parametrize("fmt", list(SAVERS))
def test_the_icc_profile_of_tile_zero_reaches_the_result(store: TileStore, fmt: str) -> None:
    image = noise_image(160, 120, 3, seed=5).icc_transform("srgb", input_profile="srgb")
    profile = image.get("icc-profile-data")
    plan = put_output_tiles(store, image, 64)
    _, body = streamed(store, plan, image, fmt, {})
    assert pyvips.Image.new_from_buffer(body, "").get("icc-profile-data") == profile


def test_options_reach_the_encoder(store: TileStore) -> None:
    image = noise_image(200, 150, 3, seed=9)
    plan = put_output_tiles(store, image, 64)
    _, jpeg = streamed(store, plan, image, "jpeg", {"quality": 40})
    _, webp = streamed(store, plan, image, "webp", {"lossless": True})
    as_stored = pyvips.Image.new_from_buffer(image.tiffsave_buffer(predictor="none"), "")
    assert jpeg == as_stored.jpegsave_buffer(Q=40)
    assert webp == as_stored.webpsave_buffer(lossless=True)


def test_the_streaming_merge_writes_nothing_to_local_disk(
    store: TileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = noise_image(300, 200, 3, seed=2)
    plan = put_output_tiles(store, image, 64)
    # Every way the merger could reach a scratch file leads nowhere: Python's temporary
    # directory is absent, and libvips' file savers and temporary images are spied on.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))
    written: list[str] = []
    for name in ("write_to_file", "new_temp_file"):
        monkeypatch.setattr(
            pyvips.Image, name, lambda *args, name=name, **kwargs: written.append(name)
        )
    for fmt in SAVERS:
        _, body = streamed(store, plan, image, fmt, {})
        assert body == reference(image, fmt)
    assert written == []
    assert list(tmp_path.iterdir()) == []


class CountingSink:
    """Stands in for the multipart upload: counts the encoded bytes and keeps none."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.size = 0

    def __enter__(self) -> CountingSink:
        return self

    def __exit__(self, *args: Any) -> None:
        pass

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_memory_stays_within_a_few_rows_of_tiles(
    store: TileStore, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    image = synthetic_image(1024, 4096).copy_memory()
    plan = put_output_tiles(store, image, 128)
    row_bytes = image.width * plan.output_tile * image.bands
    # The upload's parts are bounded by their own size (three parts at most); here the
    # encoded bytes are dropped so that what is measured is the tiles the merger holds.
    monkeypatch.setattr(tilefan.stages.stream_merge, "MultipartWriter", CountingSink)
    pipeline: Any = SimpleNamespace(store=store)
    tracemalloc.start()
    try:
        output = merge_streamed(pipeline, JOB, plan, image.interpretation, fmt, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert output["size_bytes"] > 0
    # The tile row being encoded, the one downloading, and tiles in flight; holding all 32
    # rows would be the whole image.
    assert peak < 3 * row_bytes + 2**20, (peak, row_bytes)
    assert peak < image.width * image.height * image.bands / 4


def test_a_missing_tile_aborts_the_upload_and_leaves_no_result(store: TileStore) -> None:
    image = noise_image(300, 200, 3, seed=4)
    plan = put_output_tiles(store, image, 64)
    store.client.delete_object(Bucket=store.bucket, Key=keys.tile(JOB, "out", plan.tile_count - 1))
    with pytest.raises(ObjectMissing):
        streamed(store, plan, image, "png", {})
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    assert store.list_keys(keys.result_prefix(JOB)) == []


def test_a_failing_part_upload_is_raised_as_itself_and_aborts(
    store: TileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = noise_image(600, 600, 3, seed=8)
    plan = put_output_tiles(store, image, 128)
    # Parts of the smallest size, and the second one refused: the encoder is stopped there.
    monkeypatch.setattr(tilefan.state.multipart, "MIN_PART_SIZE", 5 * 2**20 // 8)

    def upload_part(self: Any, number: int, body: bytes) -> Any:
        if number == 2:
            raise TransientError("storage was busy (SlowDown)")
        return real(self, number, body)

    real = tilefan.state.multipart.MultipartWriter._upload_part
    monkeypatch.setattr(tilefan.state.multipart.MultipartWriter, "_upload_part", upload_part)
    with pytest.raises(TransientError):
        streamed(store, plan, image.copy(), "png", {})
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []

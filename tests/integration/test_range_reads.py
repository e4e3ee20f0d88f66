"""The splitter as a planner: tiled uploads read by range where they are, others transcoded once.

Whole jobs on the embedded engine check that every input kind gives the whole-image result;
the storage classes are checked on the engine's moto for what they request and how they fail.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
import pyvips
import tifffile
from botocore.exceptions import ClientError, ReadTimeoutError

import tilefan.formats.tiled
import tilefan.stages.split
import tilefan.state.ranged
from tests.support import assert_identical, noise_image, shared_image
from tilefan import parse_chain
from tilefan.errors import DamagedImage, TransientError
from tilefan.formats.remote import ObjectSource
from tilefan.formats.source import open_checked, upright
from tilefan.formats.tiled import open_object, range_readable, source_block, transcode
from tilefan.imaging.geometry import Rect
from tilefan.imaging.plan import ImageSpec, plan_tiles
from tilefan.local.stack import LocalStack, run_job
from tilefan.state.jobs import JobStatus
from tilefan.state.ranged import PART_SIZE, MultipartObject, RangedObject
from tilefan.state.storage import ObjectMissing, TileStore, keys

pytestmark = pytest.mark.integration

OPS = [{"op": "gaussblur", "sigma": 1.5}, {"op": "invert"}]
"""A chain with a halo: a tile needs its neighbours' pixels, so every border shows."""


@pytest.fixture
def store(stack: LocalStack) -> TileStore:
    return stack.service.store


def _tiled(**options: Any) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        image = noise_image(300, 220, options.pop("bands", 3), options.pop("fmt", "uchar"))
        image.tiffsave(str(path), tile=True, tile_width=64, tile_height=64, **options)

    return build


def _pages(path: Path) -> None:
    pages = [noise_image(300, 220, 3, seed=seed) for seed in (1, 2, 3)]
    stacked = pyvips.Image.arrayjoin(pages, across=1).copy()
    stacked.set_type(pyvips.GValue.gint_type, "page-height", 220)
    stacked.tiffsave(str(path), tile=True, tile_width=64, tile_height=64, compression="deflate")


def _oriented(path: Path) -> None:
    image = noise_image(300, 220, 3, seed=4).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)
    image.tiffsave(str(path), tile=True, tile_width=64, tile_height=64)


def _saved(suffix: str, **options: Any) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        noise_image(300, 220, 3, seed=5).write_to_file(str(path), **options)

    return build


RANGE_READ = {
    "tiled.tif": _tiled(compression="deflate"),
    "bigtiff.tif": _tiled(fmt="ushort", bigtiff=True, compression="lzw"),
    "svs-like.tif": _tiled(compression="jpeg", Q=90),
    "pages.tif": _pages,
    "oriented-6.tif": _oriented,
}
"""Tiled TIFFs: the workers read the upload itself."""

TRANSCODED = {
    "photo.jpg": _saved(".jpg", Q=90),
    "photo.png": _saved(".png"),
    "photo.webp": _saved(".webp", lossless=True),
    "photo.gif": _saved(".gif"),
    "strips.tif": _saved(".tif", compression="deflate"),
}
"""Inputs decoded only from the top: the splitter transcodes them into jobs/<id>/source.tif."""


class Watch:
    """Keys written under jobs/ and transcodes run, while the engine runs a job in-process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.written: list[str] = []
        self.transcoded: list[str] = []
        real_put, real_multipart = TileStore._put, MultipartObject.__init__
        real_transcode = tilefan.stages.split.transcode

        def put(store: TileStore, key: str, body: bytes, *a: Any) -> None:
            self.written.append(key)
            real_put(store, key, body, *a)

        def multipart(upload: MultipartObject, client: Any, bucket: str, key: str, *a: Any) -> None:
            self.written.append(key)
            real_multipart(upload, client, bucket, key, *a)

        def watched(image: pyvips.Image, *args: Any) -> int:
            self.transcoded.append(str(args[2]))
            return int(real_transcode(image, *args))

        monkeypatch.setattr(TileStore, "_put", put)
        monkeypatch.setattr(MultipartObject, "__init__", multipart)
        monkeypatch.setattr(tilefan.stages.split, "transcode", watched)


def _run(stack: LocalStack, source: Path, tmp_path: Path) -> tuple[Any, pyvips.Image]:
    output = tmp_path / "out.tif"
    view = run_job(
        stack, source, output, OPS, output_format="tiff", tile_size=96, poll_seconds=0.05
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    expected = reduce(
        lambda im, step: step.apply(im),
        parse_chain(OPS),
        upright(pyvips.Image.new_from_file(str(source))),
    )
    assert_identical(expected, pyvips.Image.new_from_file(str(output)))
    assert stack.service.store.list_keys(keys.job_prefix(view.job.job_id)) == []
    return view, expected


@pytest.mark.parametrize("name", sorted(RANGE_READ))
def test_tiled_upload_is_read_where_it_is_and_equals_whole_image(
    stack: LocalStack, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / name
    RANGE_READ[name](source)
    watch = Watch(monkeypatch)
    view, _ = _run(stack, source, tmp_path)
    job_id = view.job.job_id
    assert view.job.grid["read"] == {"key": keys.upload(job_id), "page": 0}
    assert watch.transcoded == []
    # The splitter wrote the manifest and nothing else; the workers only their output tiles.
    written = [key for key in watch.written if key.startswith(keys.job_prefix(job_id))]
    assert keys.manifest(job_id) in written
    # Nothing but the manifest and the workers' output (tiles, or a tiff result's encoded batches).
    outputs = ("/out/", "/encoded/")
    assert [
        k for k in written if k != keys.manifest(job_id) and not any(o in k for o in outputs)
    ] == []
    assert view.job.grid["bytes_split"] == 0


@pytest.mark.parametrize("name", sorted(TRANSCODED))
def test_other_input_is_transcoded_once_and_equals_whole_image(
    stack: LocalStack, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / name
    TRANSCODED[name](source)
    watch = Watch(monkeypatch)
    view, _ = _run(stack, source, tmp_path)
    job_id = view.job.job_id
    assert view.job.grid["read"] == {"key": keys.source(job_id), "page": 0}
    assert watch.transcoded == [keys.source(job_id)]
    assert view.job.grid["bytes_split"] > 0


def test_a_wide_image_is_transcoded_in_shorter_tiles_and_equals_whole_image(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "wide.jpg"
    noise_image(1500, 700, 3, seed=11).jpegsave(str(source))
    # A budget of 20 rows of this width: the plan's 32 px edge (tile 96) gives 16-row tiles.
    monkeypatch.setattr(tilefan.formats.tiled, "TILE_ROW_BYTES", 20 * 1500 * 3)
    heights: list[int] = []
    real_height = tilefan.formats.tiled.transcode_tile_height

    def height(edge: int, image: pyvips.Image) -> int:
        heights.append(real_height(edge, image))
        return heights[-1]

    monkeypatch.setattr(tilefan.formats.tiled, "transcode_tile_height", height)
    _run(stack, source, tmp_path)
    assert heights == [16]


@pytest.mark.shared_images
@pytest.mark.parametrize(
    "name", ["sample.jpg", "sample.png", "sample.tif", "big-height.webp", "invalid_multiframe.gif"]
)
def test_shared_image_is_transcoded_and_equals_whole_image(
    stack: LocalStack, tmp_path: Path, name: str
) -> None:
    view, _ = _run(stack, shared_image(name), tmp_path)
    assert view.job.grid["read"]["key"] == keys.source(view.job.job_id)


# --- what is asked of S3 -----------------------------------------------------------------------


def _upload(store: TileStore, key: str, path: Path) -> None:
    store.upload(path, key, "application/octet-stream")


def test_splitter_reads_under_one_percent_of_a_large_tiled_tiff(
    store: TileStore, tmp_path: Path
) -> None:
    # 64 MP of one band, uncompressed (64 MiB): the header is the same few KB at 200 MP, so
    # the ratio there is smaller still.
    path = tmp_path / "large.tif"
    pattern = (pyvips.Image.xyz(8192, 8192)[0] % 251).cast("uchar")
    pattern.tiffsave(str(path), tile=True, tile_width=256, tile_height=256)
    key = "uploads/range-test/large"
    _upload(store, key, path)
    header, origin = open_object(store, key, name="upload", access="sequential")
    assert range_readable(header)
    plan_tiles(ImageSpec.of(upright(header)), parse_chain(OPS), 1024)
    remote = origin.remote
    assert remote.bytes_fetched < 0.01 * remote.size, (remote.bytes_fetched, remote.requests)
    # The directory is read several times per open; each block is fetched once.
    assert remote.requests <= 4, remote.requests


def test_each_worker_reads_its_tiles_and_halo_and_the_directory(
    store: TileStore, tmp_path: Path
) -> None:
    path = tmp_path / "noise.tif"
    noise_image(2048, 2048, 3, seed=9).tiffsave(
        str(path), tile=True, tile_width=256, tile_height=256, compression="deflate"
    )
    key = "uploads/range-test/noise"
    _upload(store, key, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        counts = page.databytecounts
        across = -(-page.imagewidth // page.tilewidth)
    opening = RangedObject(store.client, store.bucket, key)
    open_checked(ObjectSource(opening), access="random")
    spec = ImageSpec(2048, 2048, 3, "uchar", "srgb")
    plan = plan_tiles(spec, parse_chain(OPS), 512)
    batch = [plan.tile(index) for index in (5, 6, 9, 10)]  # interior tiles: halo on every side
    tilefan.formats.tiled._opened.cache_clear()
    for tile in batch:
        source_block(store, key, 0, tile.source, "srgb")
    _, worker, _ = tilefan.formats.tiled._opened(store, key, 0)
    touched = {
        (row, column)
        for tile in batch
        for row in range(tile.source.y // 256, (tile.source.y + tile.source.h - 1) // 256 + 1)
        for column in range(tile.source.x // 256, (tile.source.x + tile.source.w - 1) // 256 + 1)
    }
    share = sum(int(counts[row * across + column]) for row, column in touched)
    read = worker.remote.bytes_fetched
    assert share <= read <= share + opening.bytes_fetched, (read, share, opening.bytes_fetched)
    assert read < 0.6 * worker.remote.size  # 4 of 16 tiles, with their halo


def test_a_block_costs_a_request_per_row_of_tiff_tiles_not_one_per_tiff_tile(
    store: TileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rows.tif"
    noise_image(2048, 2048, 3, seed=10).tiffsave(
        str(path), tile=True, tile_width=256, tile_height=256, compression="deflate"
    )
    key = "uploads/range-test/rows"
    _upload(store, key, path)
    tilefan.formats.tiled._opened.cache_clear()
    _, worker, layout = tilefan.formats.tiled._opened(store, key, 0)
    assert layout is not None
    plan = plan_tiles(ImageSpec(2048, 2048, 3, "uchar"), parse_chain(OPS), 1024)
    rect = plan.tile(0).source  # 1024 px and its halo: 5 x 5 TIFF tiles
    rows = range(rect.y // 256, (rect.bottom - 1) // 256 + 1)
    columns = range(rect.x // 256, (rect.right - 1) // 256 + 1)
    opened, fetched = worker.remote.requests, worker.remote.bytes_fetched
    # A cache smaller than the block: the prefetch is still kept whole until libvips has it.
    monkeypatch.setattr(tilefan.state.ranged, "CACHED_BYTES", 256 * 2**10)
    block = source_block(store, key, 0, rect, "srgb")
    # One ranged GET per row of TIFF tiles (a row's tiles lie next to each other, the rows
    # a row of the image apart), sent at once; libtiff then reads every tile from memory.
    assert worker.remote.requests - opened == len(rows) < len(rows) * len(columns)
    with tifffile.TiffFile(path) as tif:
        counts = tif.pages[0].databytecounts
    share = sum(int(counts[row * 8 + column]) for row in rows for column in columns)
    assert worker.remote.bytes_fetched - fetched == share > 2 * 2**20
    # Then what is past the cache's bound is dropped, before the chain makes its copies (all
    # but the most recently read request, a row of 5 TIFF tiles here, larger than the bound).
    assert worker.remote.kept_bytes < share / 4
    whole = pyvips.Image.new_from_file(str(path))
    assert_identical(whole.crop(*rect), block)


@pytest.mark.parametrize(
    ("name", "page"),
    [(name, 0) for name in sorted(RANGE_READ)] + [("pages.tif", 2)],
)
def test_the_prefetch_holds_every_byte_libtiff_reads_for_a_block(
    store: TileStore, tmp_path: Path, name: str, page: int
) -> None:
    source = tmp_path / name
    RANGE_READ[name](source)
    key = f"uploads/range-test/prefetch-{page}-{name}"
    _upload(store, key, source)
    tilefan.formats.tiled._opened.cache_clear()
    image, opened, layout = tilefan.formats.tiled._opened(store, key, page)
    assert layout is not None
    rect = Rect(70, 50, 130, 100)  # across TIFF tiles, away from the image's origin
    ranges = layout.ranges(rect)
    opened.remote.prefetch(ranges)
    prefetched = opened.remote.requests
    block = image.crop(*rect).copy_memory()
    assert opened.remote.requests == prefetched
    # Only the tiles under the rectangle, whatever the orientation: not the whole image.
    assert sum(end - start for start, end in ranges) < 0.6 * sum(layout.byte_counts)
    whole = upright(pyvips.Image.new_from_file(str(source), page=page))
    assert_identical(whole.crop(*rect), block)


def test_a_failed_prefetch_is_retryable(
    store: TileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiled.tif"
    noise_image(600, 400, 3, seed=2).tiffsave(str(path), tile=True, tile_width=64, tile_height=64)
    key = "uploads/range-test/prefetch-fails"
    _upload(store, key, path)
    tilefan.formats.tiled._opened.cache_clear()
    tilefan.formats.tiled._opened(store, key, 0)
    calls = []

    def throttled(self: RangedObject, start: int, end: int) -> bytes:
        calls.append(start)
        raise TransientError("storage was busy (SlowDown)")

    monkeypatch.setattr(RangedObject, "_fetch", throttled)
    with pytest.raises(TransientError):
        source_block(store, key, 0, Rect(100, 100, 200, 200), "srgb")
    assert len(calls) >= 1


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data


class _Client:
    """An S3 client whose GetObject answers with ``answer`` (bytes, or an error to raise)."""

    def __init__(self, answer: bytes | Exception) -> None:
        self.answer = answer

    def head_object(self, **kwargs: Any) -> dict[str, Any]:
        return {"ContentLength": 1000}

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return {"Body": _Body(self.answer)}


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (_client_error("SlowDown"), TransientError),
        (_client_error("InternalError"), TransientError),
        (_client_error("NoSuchKey"), ObjectMissing),
        (ReadTimeoutError(endpoint_url="https://s3"), TransientError),
        (b"short", TransientError),  # a body cut short
    ],
    ids=["throttled", "5xx", "missing", "read-timeout", "truncated-body"],
)
def test_range_read_failures_are_named_and_transient_ones_retry(
    answer: bytes | Exception, expected: type[Exception]
) -> None:
    remote = RangedObject(_Client(answer), "bucket", "uploads/x/source")  # type: ignore[arg-type]
    with pytest.raises(expected):
        remote.read(0, 100)


def test_a_failed_read_reaches_the_worker_as_retryable_not_as_a_damaged_tile(
    store: TileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiled.tif"
    noise_image(1200, 900, 3, seed=3).tiffsave(str(path), tile=True, compression="deflate")
    key = "uploads/range-test/flaky"
    _upload(store, key, path)
    tilefan.formats.tiled._opened.cache_clear()
    _, opened, _ = tilefan.formats.tiled._opened(store, key, 0)  # opened while storage answers

    def throttled(self: RangedObject, *args: int) -> bytes:
        raise TransientError("storage was busy (SlowDown)")

    # The prefetch answers, then libtiff's own reads fail: libvips may take them as warnings.
    monkeypatch.setattr(RangedObject, "prefetch", lambda self, ranges: None)
    monkeypatch.setattr(RangedObject, "read", throttled)
    plan = plan_tiles(ImageSpec(1200, 900, 3, "uchar"), parse_chain(OPS), 256)
    rect = plan.tile(plan.tile_count // 2).source
    with pytest.raises(TransientError):
        source_block(store, key, 0, rect, "srgb")
    monkeypatch.undo()
    assert tilefan.formats.tiled._opened(store, key, 0)[1] is not opened
    assert source_block(store, key, 0, rect, "srgb").width == rect.w  # opened afresh


def test_transcode_streams_parts_and_reads_back_identical(store: TileStore, tmp_path: Path) -> None:
    image = noise_image(2400, 2000, 3, seed=6)  # incompressible: about 14 MiB, two parts
    path = tmp_path / "noise.png"
    image.pngsave(str(path), compression=1)
    _upload(store, "uploads/range-test/png", path)
    header, origin = open_object(
        store, "uploads/range-test/png", name="upload", access="sequential"
    )
    size = transcode(header, origin, store, "jobs/range-test/source.tif", 256)
    assert size > PART_SIZE
    # Read in order, a few KB at a time: windows that grow, not a request per 64 KiB block.
    assert origin.remote.requests < 16 < origin.remote.size // 2**16, origin.remote.requests
    body = store.client.get_object(Bucket=store.bucket, Key="jobs/range-test/source.tif")["Body"]
    back = pyvips.Image.new_from_buffer(body.read(), "")
    assert back.get("tile-width") == 256
    assert_identical(image, back)


def test_a_failed_transcode_leaves_no_object_and_no_upload(
    store: TileStore, tmp_path: Path
) -> None:
    whole = noise_image(600, 400, 3, seed=8).jpegsave_buffer()
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    _upload(store, "uploads/range-test/cut", path)
    header, origin = open_object(
        store, "uploads/range-test/cut", name="upload", access="sequential"
    )
    with pytest.raises(DamagedImage):
        transcode(header, origin, store, "jobs/range-test/cut.tif", 256)
    assert store.size("jobs/range-test/cut.tif") is None
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix="jobs/range-test/")
    assert uploads.get("Uploads", []) == []


def test_multipart_object_takes_libtiffs_seeks_back_to_the_header(store: TileStore) -> None:
    upload = MultipartObject(store.client, store.bucket, "jobs/range-test/seeks", "image/tiff")
    payload = bytes(range(256)) * (3 * PART_SIZE // 256)
    upload.write(b"HEADER..")
    upload.write(payload)
    upload.seek(upload.size + 2)  # a reserved place, filled below (libtiff's directory)
    upload.write(b"TAIL")
    upload.seek(upload.size - 6)
    upload.write(b"IF")
    upload.seek(4)
    upload.write(b"!!")
    upload.complete()
    body = store.client.get_object(Bucket=store.bucket, Key="jobs/range-test/seeks")["Body"]
    assert body.read() == b"HEAD!!.." + payload + b"IFTAIL"

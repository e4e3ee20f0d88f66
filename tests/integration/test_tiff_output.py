"""TIFF results assembled around the workers' encoded tiles, on the embedded engine."""

from __future__ import annotations

import builtins
import inspect
import logging
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import botocore.client
import numpy as np
import pytest
import pyvips
import tifffile
from botocore.exceptions import ClientError

import tilefan.formats.tiff_tiles
import tilefan.stages.process
import tilefan.stages.tiff_output
from tests.support import assert_identical, noise_image, shared_image, whole
from tilefan import TransientError
from tilefan.errors import TilefanError
from tilefan.formats.source import upright
from tilefan.local.stack import LocalStack, run_job
from tilefan.state.jobs import JobRepository, JobStatus
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration

BLUR = [{"op": "gaussblur", "sigma": 1.5}]


def run_tiff(
    stack: LocalStack,
    source: pyvips.Image | Path,
    tmp_path: Path,
    ops: list[dict[str, Any]],
    tile_size: int,
    **options: Any,
) -> Path:
    if isinstance(source, pyvips.Image):
        path = tmp_path / "source.png"
        source.pngsave(str(path))
        source = path
    output = tmp_path / "out.tif"
    view = run_job(
        stack,
        source,
        output,
        ops,
        output_format="tiff",
        tile_size=tile_size,
        output_options=options,
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert stack.service.store.list_keys(keys.job_prefix(view.job.job_id)) == []
    return output


def libvips_tiff(image: pyvips.Image, tmp_path: Path, **options: Any) -> Path:
    """The result as the whole-image save writes it."""
    path = tmp_path / "libvips.tif"
    image.tiffsave(str(path), tile=True, tile_width=256, tile_height=256, **options)
    return path


def pages(path: Path) -> list[pyvips.Image]:
    count = pyvips.Image.new_from_file(str(path)).get("n-pages")
    return [pyvips.Image.new_from_file(str(path), page=page) for page in range(count)]


@pytest.mark.parametrize("compression", ["deflate", "lzw", "none"])
@pytest.mark.parametrize(("width", "height", "tile_size"), [(1100, 700, 256), (777, 1333, 512)])
def test_lossless_tiff_equals_whole_image_libvips(
    stack: LocalStack, tmp_path: Path, compression: str, width: int, height: int, tile_size: int
) -> None:
    image = noise_image(width, height, 3, seed=width)
    output = run_tiff(stack, image, tmp_path, BLUR, tile_size, compression=compression)
    assert_identical(whole(image, BLUR), pyvips.Image.new_from_file(str(output)))
    with tifffile.TiffFile(output) as tiff:
        page = tiff.pages[0]
        assert (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression == {"deflate": 8, "lzw": 5, "none": 1}[compression]
        assert not tiff.is_bigtiff


@pytest.mark.parametrize(("fmt", "bands"), [("uchar", 4), ("char", 2), ("ushort", 3), ("short", 1)])
def test_deflate_tiles_compressed_by_the_worker_decode_to_libvips_pixels(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, bands: int
) -> None:
    # Edge blocks on both sides (700 x 530 over 256 px blocks), alpha and signed pixels: the
    # worker's own predictor and libdeflate must give what libtiff decodes to the same pixels.
    image = noise_image(700, 530, bands, fmt, seed=bands)
    source = tmp_path / "source.tif"
    image.tiffsave(str(source))
    compressed = []
    original = tilefan.formats.tiff_tiles.deflate.zlib_compress
    monkeypatch.setattr(
        tilefan.formats.tiff_tiles.deflate,
        "zlib_compress",
        lambda data, level: compressed.append(level) or original(data, level),
    )
    output = run_tiff(stack, source, tmp_path, BLUR, 256, compression="deflate")
    got = pyvips.Image.new_from_file(str(output))
    assert got.format == image.format
    want = whole(image, BLUR)
    assert_identical(want, got)
    # Every block but the first (which carries the tags) took the worker's own path, at
    # libvips' level (the splitter's transcode of the strip TIFF compresses at level 1).
    assert compressed.count(6) == 3 * 3 - 1
    # GDAL's and tifffile's decoders read the same pixels as libvips'.
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a picture has no map coordinates
        with rasterio.open(output) as dataset:
            read = dataset.read()
    assert np.array_equal(np.moveaxis(read, 0, -1), want.numpy().reshape(530, 700, bands))
    assert np.array_equal(tifffile.imread(output).reshape(530, 700, bands), read.transpose(1, 2, 0))


def test_jpeg_tiff_equals_libvips_jpeg_tiff_decoded(stack: LocalStack, tmp_path: Path) -> None:
    image = noise_image(900, 650, 3, seed=3)
    output = run_tiff(stack, image, tmp_path, BLUR, 256, compression="jpeg", quality=80)
    expected = libvips_tiff(whole(image, BLUR), tmp_path, compression="jpeg", Q=80)
    assert_identical(
        pyvips.Image.new_from_file(str(expected)), pyvips.Image.new_from_file(str(output))
    )


@pytest.mark.parametrize(
    ("width", "height", "tile_size", "compression"),
    [
        (1500, 1100, 256, "deflate"),
        (2600, 1900, 1024, "deflate"),
        (3000, 530, 512, "deflate"),
        (1300, 1700, 512, "jpeg"),
    ],
)
def test_pyramid_pages_equal_libvips_pyramid_and_pass_cog_validation(
    stack: LocalStack, tmp_path: Path, width: int, height: int, tile_size: int, compression: str
) -> None:
    image = noise_image(width, height, 3, seed=height)
    output = run_tiff(
        stack, image, tmp_path, BLUR, tile_size, pyramid=True, compression=compression
    )
    expected = libvips_tiff(whole(image, BLUR), tmp_path, compression=compression, pyramid=True)
    got, want = pages(output), pages(expected)
    assert len(got) == len(want)
    for page_got, page_want in zip(got, want, strict=True):
        assert_identical(page_want, page_got)
    assert_cog(output)


def assert_cog(path: Path) -> None:
    """rio-cogeo's validator, strict: a warning (overviews missing, ...) fails too."""
    from rasterio.errors import NotGeoreferencedWarning
    from rio_cogeo.cogeo import cog_validate

    with warnings.catch_warnings():
        # A picture has no map coordinates; that is not a layout fault.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        valid, errors, cog_warnings = cog_validate(str(path), strict=True)
    assert valid, (errors, cog_warnings)


def test_pyramid_of_an_image_with_alpha_equals_libvips(stack: LocalStack, tmp_path: Path) -> None:
    image = noise_image(1100, 900, 4, seed=4)
    output = run_tiff(stack, image, tmp_path, BLUR, 512, pyramid=True)
    expected = libvips_tiff(whole(image, BLUR), tmp_path, pyramid=True)
    got, want = pages(output), pages(expected)
    assert len(got) == len(want) == 4
    for page_got, page_want in zip(got, want, strict=True):
        assert_identical(page_want, page_got)


def test_bigtiff_is_written_past_the_threshold_and_reads_back(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tilefan.stages.tiff_output, "BIGTIFF_ABOVE", 1000)
    image = noise_image(1200, 900, 3, seed=5)
    output = run_tiff(stack, image, tmp_path, BLUR, 512, pyramid=True)
    with tifffile.TiffFile(output) as tiff:
        assert tiff.is_bigtiff
    expected = libvips_tiff(whole(image, BLUR), tmp_path, pyramid=True)
    for page_got, page_want in zip(pages(output), pages(expected), strict=True):
        assert_identical(page_want, page_got)
    assert_cog(output)


def test_an_icc_profile_and_resolution_reach_the_result(stack: LocalStack, tmp_path: Path) -> None:
    source = shared_image("sample.jpg")
    ops = [{"op": "sharpen"}]
    output = run_tiff(stack, source, tmp_path, ops, 256)
    expected = whole(upright(pyvips.Image.new_from_file(str(source))), ops)
    result = pyvips.Image.new_from_file(str(output))
    assert_identical(expected, result)
    assert (result.xres, result.yres) == pytest.approx((expected.xres, expected.yres))
    if expected.get_typeof("icc-profile-data"):
        assert result.get("icc-profile-data") == expected.get("icc-profile-data")


def test_a_shared_image_with_a_pyramid_equals_libvips(stack: LocalStack, tmp_path: Path) -> None:
    source = shared_image("sample.png")
    output = run_tiff(stack, source, tmp_path, BLUR, 256, pyramid=True, compression="lzw")
    image = upright(pyvips.Image.new_from_file(str(source)))
    expected = libvips_tiff(whole(image, BLUR), tmp_path, compression="lzw", pyramid=True)
    for page_got, page_want in zip(pages(output), pages(expected), strict=True):
        assert_identical(page_want, page_got)


def in_merger() -> bool:
    """Called from the merge stage (workers never pass through stages/merge.py)."""
    return any(
        Path(frame.filename).parts[-2:] == ("stages", "merge.py") for frame in inspect.stack()
    )


def test_the_merger_decodes_no_pixels_and_writes_no_scratch_for_tiff(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way to read pixels or make a scratch file is watched while the merger runs."""
    seen: list[str] = []

    def spy(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            if in_merger() and (name != "open" or _writes(args, kwargs)):
                seen.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    for name in ("new_from_buffer", "new_from_file", "new_from_memory", "new_from_source"):
        spy(pyvips.Image, name)
    for name in ("TemporaryDirectory", "mkstemp", "mkdtemp", "NamedTemporaryFile"):
        spy(tempfile, name)
    spy(builtins, "open")
    image = noise_image(1300, 1000, 3, seed=11)
    # The preview's coarse levels are made from raw pieces, as a DeepZoom result's
    # (test_tileset_output.py bounds them): this watches the TIFF's own assembly.
    output = run_tiff(stack, image, tmp_path, BLUR, 512, compression="deflate", preview=False)
    assert seen == []
    assert_identical(whole(image, BLUR), pyvips.Image.new_from_file(str(output)))
    # The spy does see the merger: a format it encodes from decoded tiles (a streamed jpeg)
    # trips it.
    run_job(
        stack,
        tmp_path / "source.png",
        tmp_path / "out.jpg",
        BLUR,
        output_format="jpeg",
        tile_size=512,
        poll_seconds=0.05,
    )
    assert "new_from_source" in seen


def _writes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
    return any(flag in str(mode) for flag in "wax+")


def _copies_by_function(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """UploadPartCopy requests counted by the function whose client made them."""
    names = {
        id(inspect.unwrap(stack.engine.handler(name)).__globals__["pipeline"].store.client): name
        for name in ("TileWorkerFunction", "MergerFunction")
    }
    copies: Counter[str] = Counter()
    real = botocore.client.BaseClient._make_api_call

    def counted(self: Any, operation: str, params: Any) -> Any:
        if operation == "UploadPartCopy":
            copies[names.get(id(self), "other")] += 1
        return real(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counted)
    return copies


def test_workers_copy_their_batches_into_the_result_and_the_merger_keeps_them(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch past 5 MiB is copied server-side by its worker, in parallel; the merger
    copies only what tops its own short part up, however many batches there are."""
    copies = _copies_by_function(stack, monkeypatch)
    # Uncompressed 1024 px tiles are 3 MiB: batches of four, objects of 12 and 6 MiB.
    image = noise_image(2048, 3072, 3, seed=21)
    output = run_tiff(stack, image, tmp_path, BLUR, 1024, compression="none")
    assert_identical(whole(image, BLUR), pyvips.Image.new_from_file(str(output)))
    # The head (a few KB) is topped up from the first batch, whose rest the merger copies
    # again; the second batch's copy is kept.
    assert copies == {"TileWorkerFunction": 2, "MergerFunction": 1}, copies
    assert (
        stack.service.store.client.list_multipart_uploads(Bucket=stack.service.store.bucket).get(
            "Uploads", []
        )
        == []
    )


def test_a_batch_whose_worker_could_not_copy_it_is_placed_by_the_merger(
    stack: LocalStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    copies = _copies_by_function(stack, monkeypatch)
    real = tilefan.stages.tiff_output.copy_part

    def refused(store: Any, key: str, upload_id: str, number: int, piece: Any) -> str:
        if piece.key.endswith("/000004.tiles"):  # the second batch, from tile 4
            raise ClientError({"Error": {"Code": "AccessDenied"}}, "UploadPartCopy")
        return real(store, key, upload_id, number, piece)

    monkeypatch.setattr(tilefan.stages.tiff_output, "copy_part", refused)
    image = noise_image(2048, 3072, 3, seed=22)
    with caplog.at_level(logging.WARNING, logger="tilefan.stages.tiff_output"):
        output = run_tiff(stack, image, tmp_path, BLUR, 1024, compression="none")
    assert_identical(whole(image, BLUR), pyvips.Image.new_from_file(str(output)))
    # The merger takes the refused batch (6 MiB) into its own first part with the head, as
    # it would any range the workers did not copy, and keeps the first batch's copy.
    assert copies == {"TileWorkerFunction": 1}, copies
    assert "the merger copies it" in caplog.text


def test_a_merge_retried_after_it_completed_the_upload_assembles_the_result_again(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's last write fails once after the result's upload was completed: the retried
    merge finds the workers' upload gone and makes the result in a new one."""
    real = JobRepository.transition
    refused: list[str] = []

    def flaky(self: JobRepository, job_id: str, status: JobStatus, **kwargs: Any) -> Any:
        if status is JobStatus.SUCCEEDED and not refused:
            refused.append(job_id)
            raise TransientError("injected: the job table was busy")
        return real(self, job_id, status, **kwargs)

    monkeypatch.setattr(JobRepository, "transition", flaky)
    copies = _copies_by_function(stack, monkeypatch)
    image = noise_image(2048, 3072, 3, seed=24)
    output = run_tiff(stack, image, tmp_path, BLUR, 1024, compression="none")
    assert_identical(whole(image, BLUR), pyvips.Image.new_from_file(str(output)))
    assert len(refused) == 1
    # The first merge kept the workers' two copies and copied once; the second copied both
    # batches itself.
    assert copies == {"TileWorkerFunction": 2, "MergerFunction": 3}, copies


def test_a_job_that_fails_after_the_workers_copied_leaves_no_upload(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TilefanError("injected: the layout failed")

    monkeypatch.setattr(tilefan.stages.tiff_output, "layout", broken)
    noise_image(2048, 3072, 3, seed=23).pngsave(str(tmp_path / "source.png"))
    view = run_job(
        stack,
        tmp_path / "source.png",
        tmp_path / "out.tif",
        BLUR,
        output_format="tiff",
        tile_size=1024,
        output_options={"compression": "none"},
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.FAILED
    assert "injected" in (view.job.error or {}).get("message", ""), view.job.error
    store = stack.service.store
    assert (
        store.client.list_multipart_uploads(
            Bucket=store.bucket, Prefix=keys.result_prefix(view.job.job_id)
        ).get("Uploads", [])
        == []
    )
    assert store.list_keys(keys.result_prefix(view.job.job_id)) == []


def test_a_batch_retried_after_some_tiles_were_done_writes_every_tile(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiff batch is one object written after its last tile: the retry redoes the done ones."""
    real = tilefan.stages.process.execute_tile
    failed: list[int] = []

    def flaky(chain: Any, spec: Any, block: Any, out: Any) -> Any:
        if (out.x, out.y) == (256, 256) and not failed:
            failed.append(1)
            raise TransientError("injected: storage hiccup")
        return real(chain, spec, block, out)

    monkeypatch.setattr(tilefan.stages.process, "execute_tile", flaky)
    image = noise_image(700, 500, 3, seed=9)
    output = run_tiff(stack, image, tmp_path, BLUR, 256)
    assert failed == [1]
    assert_identical(whole(image, BLUR), pyvips.Image.new_from_file(str(output)))

"""DeepZoom and IIIF results from the workers' tiles, on the embedded engine, against dzsave."""

from __future__ import annotations

import builtins
import inspect
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import botocore.client
import pytest
import pyvips

import tilefan.stages.process
import tilefan.stages.tileset_output
from tests.support import assert_identical, noise_image, shared_image, whole
from tilefan import TransientError
from tilefan.formats.dz_tiles import TileSetLayout
from tilefan.formats.source import upright
from tilefan.local.stack import LocalStack, run_job
from tilefan.state.jobs import JobStatus
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration

BLUR = [{"op": "gaussblur", "sigma": 1.5}]
_NAMES = {"dzi": "out.dzi", "dz": "out.zip", "iiif": "out"}


def run_set(
    stack: LocalStack,
    source: pyvips.Image | Path,
    tmp_path: Path,
    output_format: str,
    processing_tile: int,
    ops: list[dict[str, Any]] = BLUR,
    options: dict[str, Any] | None = None,
) -> Path:
    if isinstance(source, pyvips.Image):
        path = tmp_path / "source.png"
        source.pngsave(str(path))
        source = path
    output = tmp_path / "got" / _NAMES[output_format]
    output.parent.mkdir()
    view = run_job(
        stack,
        source,
        output,
        ops,
        output_format=output_format,
        tile_size=processing_tile,
        output_options=options or {},
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert stack.service.store.list_keys(keys.job_prefix(view.job.job_id)) == []
    return output


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def dzsave_files(
    image: pyvips.Image, tmp_path: Path, output_format: str, **options: Any
) -> dict[str, bytes]:
    """What libvips' dzsave writes for the whole image, by path (its properties file left out)."""
    layout = TileSetLayout.from_options(output_format, options)
    folder = tmp_path / "libvips"
    folder.mkdir()
    image.dzsave(str(folder / "out"), **layout.dzsave_arguments())
    files = files_under(folder)
    return {name: data for name, data in files.items() if not name.endswith("vips-properties.xml")}


def got_files(output: Path, output_format: str) -> dict[str, bytes]:
    """The result by the paths dzsave would give it (a set named ``out``)."""
    if output_format == "dzi":
        return files_under(output.parent)
    if output_format == "iiif":
        return {f"out/{name}": data for name, data in files_under(output).items()}
    with zipfile.ZipFile(output) as archive:
        assert archive.testzip() is None
        return {name.replace("result", "out", 1): archive.read(name) for name in archive.namelist()}


def assert_same_tiles(expected: dict[str, bytes], got: dict[str, bytes]) -> None:
    """Same names, every tile decoded equal, descriptors equal but for the IIIF id's name."""
    assert sorted(got) == sorted(expected)
    for name, data in expected.items():
        if name.endswith(".json"):
            assert got[name].replace(b"/result", b"/out") == data
        elif name.endswith(".dzi"):
            assert got[name] == data
        else:
            assert_identical(
                pyvips.Image.new_from_buffer(data, ""), pyvips.Image.new_from_buffer(got[name], "")
            )


@pytest.mark.parametrize("output_format", ["dzi", "dz", "iiif"])
@pytest.mark.parametrize(
    ("width", "height", "bands", "tile_size"),
    [(1100, 733, 3, 256), (1537, 1031, 1, 1024), (901, 1203, 4, 512), (200, 131, 3, 512)],
)
def test_every_tile_of_every_level_equals_dzsave_of_the_whole_result(
    stack: LocalStack,
    tmp_path: Path,
    output_format: str,
    width: int,
    height: int,
    bands: int,
    tile_size: int,
) -> None:
    image = noise_image(width, height, bands, seed=width + bands)
    output = run_set(stack, image, tmp_path, output_format, tile_size)
    expected = dzsave_files(whole(image, BLUR), tmp_path, output_format)
    assert_same_tiles(expected, got_files(output, output_format))


@pytest.mark.parametrize(
    ("output_format", "options"),
    [
        ("dzi", {"tile_size": 128, "overlap": 3, "suffix": "png"}),
        ("dzi", {"tile_size": 510, "overlap": 0, "quality": 90}),
        ("dz", {"tile_size": 256, "overlap": 2, "suffix": "webp", "quality": 60}),
        ("iiif", {"tile_size": 256, "suffix": "png"}),
    ],
)
def test_tile_size_overlap_and_encoding_options_match_dzsave(
    stack: LocalStack, tmp_path: Path, output_format: str, options: dict[str, Any]
) -> None:
    image = noise_image(1301, 977, 3, seed=7)
    output = run_set(stack, image, tmp_path, output_format, 1024, options=options)
    expected = dzsave_files(whole(image, BLUR), tmp_path, output_format, **options)
    assert_same_tiles(expected, got_files(output, output_format))


def test_png_tiles_of_a_16_bit_result_match_dzsave(stack: LocalStack, tmp_path: Path) -> None:
    image = noise_image(700, 515, 3, fmt="ushort", seed=8)
    output = run_set(stack, image, tmp_path, "dzi", 256, options={"suffix": "png"})
    expected = dzsave_files(whole(image, BLUR), tmp_path, "dzi", suffix="png")
    assert_same_tiles(expected, got_files(output, "dzi"))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("chelsea.png", {}),
        ("camera.png", {"tile_size": 126}),
        ("sample.jpg", {}),
        ("sample.png", {"suffix": "png"}),  # 16-bit RGB
        ("rgba.png", {}),
        ("rotation-6.jpg", {"overlap": 2}),
    ],
)
def test_a_real_image_as_a_tile_set_equals_dzsave(
    stack: LocalStack, tmp_path: Path, name: str, options: dict[str, Any]
) -> None:
    source = shared_image(name)
    ops = [{"op": "sharpen"}]
    output = run_set(stack, source, tmp_path, "dzi", 256, ops, options)
    image = upright(pyvips.Image.new_from_file(str(source)))
    expected = dzsave_files(whole(image, ops), tmp_path, "dzi", **options)
    assert_same_tiles(expected, got_files(output, "dzi"))


def test_the_zip_reads_back_with_pythons_zipfile(stack: LocalStack, tmp_path: Path) -> None:
    output = run_set(stack, noise_image(600, 400, 3, seed=2), tmp_path, "dz", 256)
    with zipfile.ZipFile(output) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names[-1] == "result.dzi"
        assert all(name.startswith("result_files/") for name in names[:-1])
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


def test_the_zip_copies_large_worker_objects_server_side(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    operations: list[str] = []
    real = botocore.client.BaseClient._make_api_call

    def counted(self: Any, operation: str, params: Any) -> Any:
        operations.append(operation)
        return real(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counted)
    # Noise in lossless png tiles: a batch of four 1016 px blocks is about 12 MiB.
    image = noise_image(2032, 2032, 3, seed=21)
    output = run_set(stack, image, tmp_path, "dz", 1024, [], {"suffix": "png"})
    assert operations.count("UploadPartCopy") >= 1, sorted(set(operations))
    expected = dzsave_files(image, tmp_path, "dz", suffix="png")
    assert_same_tiles(expected, got_files(output, "dz"))


def in_merger() -> bool:
    """Called from the merge stage (workers never pass through stages/merge.py)."""
    return any(
        Path(frame.filename).parts[-2:] == ("stages", "merge.py") for frame in inspect.stack()
    )


@pytest.mark.parametrize(
    ("output_format", "block_levels", "first_coarse"),
    # DeepZoom's 254 px tiles make 1016 px blocks (levels 0-2), IIIF's 512 px tiles 1024.
    [("dzi", 3, (263, 188)), ("dz", 3, (263, 188)), ("iiif", 2, (525, 375))],
)
def test_the_merger_decodes_no_tile_and_writes_no_scratch(
    stack: LocalStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    output_format: str,
    block_levels: int,
    first_coarse: tuple[int, int],
) -> None:
    """Every decode and scratch file is watched while the merger runs; the only pixels it
    makes are the first coarse level, from the workers' raw pieces."""
    decoded: list[str] = []
    made: list[tuple[int, int]] = []

    def spy(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            if in_merger() and (name != "open" or _writes(args, kwargs)):
                if name == "new_from_memory":
                    made.append((args[1], args[2]))
                else:
                    decoded.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    for name in ("new_from_buffer", "new_from_file", "new_from_memory", "new_from_source"):
        spy(pyvips.Image, name)
    for name in ("TemporaryDirectory", "mkstemp", "mkdtemp", "NamedTemporaryFile"):
        spy(tempfile, name)
    spy(builtins, "open")
    pieces: list[int] = []
    real_levels = tilefan.stages.tileset_output.worker_levels

    def levels(output_tile: int, tile_size: int, level_count: int) -> int:
        found = real_levels(output_tile, tile_size, level_count)
        if not in_merger():
            pieces.append(found)
        return found

    monkeypatch.setattr(tilefan.stages.tileset_output, "worker_levels", levels)
    image = noise_image(2100, 1500, 3, seed=11)
    output = run_set(stack, image, tmp_path, output_format, 1024)
    assert decoded == []
    assert pieces[-1] == block_levels
    # The merger joins the first level below the blocks' own and halves it: nothing larger.
    assert first_coarse in made
    assert all(width * height <= first_coarse[0] * first_coarse[1] for width, height in made)
    expected = dzsave_files(whole(image, BLUR), tmp_path, output_format)
    assert_same_tiles(expected, got_files(output, output_format))


def _writes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
    return any(flag in str(mode) for flag in "wax+")


def test_jpeg_tiles_of_a_float_result_are_refused_with_a_code(
    stack: LocalStack, tmp_path: Path
) -> None:
    image = noise_image(300, 200, 3, fmt="float", seed=1)
    path = tmp_path / "source.tif"
    image.tiffsave(str(path))
    view = run_job(stack, path, tmp_path / "out.dzi", BLUR, output_format="dzi", poll_seconds=0.05)
    assert view.job.status is JobStatus.FAILED
    assert view.job.error is not None and view.job.error["code"] == "INVALID_TILE_SET"


@pytest.mark.parametrize("output_format", ["dzi", "dz"])
def test_a_batch_retried_after_a_transient_failure_leaves_the_same_set(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output_format: str
) -> None:
    """Tiles already written by the failed attempt are written again, to the same keys."""
    real = tilefan.stages.process.execute_tile
    failed: list[int] = []

    def flaky(chain: Any, spec: Any, block: Any, out: Any) -> Any:
        if out.x > 0 and out.y > 0 and not failed:
            failed.append(1)
            raise TransientError("injected: storage hiccup")
        return real(chain, spec, block, out)

    monkeypatch.setattr(tilefan.stages.process, "execute_tile", flaky)
    image = noise_image(700, 500, 3, seed=9)
    output = run_set(stack, image, tmp_path, output_format, 256)
    assert failed == [1]
    expected = dzsave_files(whole(image, BLUR), tmp_path, output_format)
    assert_same_tiles(expected, got_files(output, output_format))

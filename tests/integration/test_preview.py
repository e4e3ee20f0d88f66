"""A result's DeepZoom preview (TIFF, JPEG, PNG, WebP): every tile equals dzsave of the whole
result with the preview's layout, and a streamed result itself stays the whole-image one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pyvips

from tests.integration.test_tileset_output import BLUR, assert_same_tiles, dzsave_files
from tests.support import assert_identical, noise_image, whole
from tilefan.formats.outputs import OUTPUT_FORMATS
from tilefan.local.stack import LocalStack, run_job
from tilefan.state.jobs import JobStatus
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration

PREVIEW = {"tile_size": 256, "overlap": 0, "suffix": "jpeg"}
SAVERS: dict[str, dict[str, Any]] = {"jpeg": {"Q": 90}, "png": {}, "webp": {"Q": 90}}
"""The streamed formats and libvips' saver arguments for the job's defaults."""


def run_with_preview(
    stack: LocalStack,
    image: pyvips.Image,
    tmp_path: Path,
    output_format: str,
    tile_size: int,
    **options: Any,
) -> dict[str, Any]:
    """The job's output, its id, its output tile and where its result was downloaded."""
    source = tmp_path / "source.png"
    image.pngsave(str(source))
    result = tmp_path / f"out.{OUTPUT_FORMATS[output_format][0]}"
    view = run_job(
        stack,
        source,
        result,
        BLUR,
        output_format=output_format,
        tile_size=tile_size,
        output_options={"preview": True, **options},  # run_job turns it off by default
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert view.job.output is not None and view.job.grid is not None
    return {
        "job_id": view.job.job_id,
        "output_tile": view.job.grid["output_tile"],
        "path": result,
        **view.job.output,
    }


def preview_files(stack: LocalStack, job_id: str) -> dict[str, bytes]:
    """The preview's objects by the paths dzsave gives a set named ``out``."""
    store = stack.service.store
    prefix = keys.result_prefix(job_id) + "preview/"
    return {
        key.removeprefix(prefix).replace("result", "out", 1): store.get_bytes(key)
        for key in store.list_keys(prefix)
    }


@pytest.mark.parametrize(
    ("output_format", "width", "height", "bands", "tile_size"),
    [
        ("tiff", 1100, 733, 3, 256),
        ("tiff", 901, 1203, 4, 512),
        ("tiff", 1537, 1031, 1, 1024),
        ("tiff", 200, 131, 3, 256),
        ("png", 901, 1203, 4, 512),  # the preview's JPEG tiles flatten the alpha
        ("png", 600, 450, 3, 100),  # a planned tile that is not whole preview tiles
        ("jpeg", 1100, 733, 3, 256),
        ("jpeg", 1537, 1031, 1, 1024),
        ("webp", 1100, 733, 3, 256),
        ("webp", 200, 131, 3, 256),
    ],
)
def test_the_preview_equals_dzsave_of_the_whole_result(
    stack: LocalStack,
    tmp_path: Path,
    output_format: str,
    width: int,
    height: int,
    bands: int,
    tile_size: int,
) -> None:
    image = noise_image(width, height, bands, seed=width + bands)
    output = run_with_preview(stack, image, tmp_path, output_format, tile_size)
    job_id = output["job_id"]
    assert output["preview"] == {
        "key": f"results/{job_id}/preview/result.dzi",
        "prefix": f"results/{job_id}/preview/result_files/",
    }
    # A block of 256 * 2**m pixels is whole preview tiles at each of its first m + 1 levels.
    assert output["output_tile"] == max(256, tile_size)
    expected = whole(image, BLUR)
    assert_same_tiles(
        dzsave_files(expected, tmp_path, "dzi", **PREVIEW), preview_files(stack, job_id)
    )
    if output_format in SAVERS:
        # The result is still the whole image's: the same pixels through the same encoder.
        reference = tmp_path / f"reference.{output_format}"
        getattr(expected, f"{output_format}save")(str(reference), **SAVERS[output_format])
        assert_identical(
            pyvips.Image.new_from_file(str(reference)),
            pyvips.Image.new_from_file(str(output["path"])),
        )


@pytest.mark.parametrize("output_format", ["tiff", *SAVERS])
def test_preview_off_writes_none_and_keeps_the_planned_tile(
    stack: LocalStack, tmp_path: Path, output_format: str
) -> None:
    image = noise_image(600, 400, 3, seed=2)
    output = run_with_preview(stack, image, tmp_path, output_format, 100, preview=False)
    assert "preview" not in output
    assert preview_files(stack, output["job_id"]) == {}
    # Only a TIFF's own tiles still need 256-pixel blocks.
    assert output["output_tile"] == (256 if output_format == "tiff" else 100)


@pytest.mark.parametrize("output_format", ["tiff", "png"])
def test_a_16_bit_result_gets_no_preview_and_still_succeeds(
    stack: LocalStack, tmp_path: Path, output_format: str
) -> None:
    image = noise_image(600, 400, 3, seed=3).cast("ushort") * 200
    output = run_with_preview(stack, image.cast("ushort"), tmp_path, output_format, 256)
    assert "preview" not in output
    assert preview_files(stack, output["job_id"]) == {}
    assert output["pixel_format"] == "ushort"

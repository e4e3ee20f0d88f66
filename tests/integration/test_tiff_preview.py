"""A TIFF result's DeepZoom preview: every tile equals dzsave of the whole result, same layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

from tests.integration.test_tileset_output import BLUR, assert_same_tiles, dzsave_files, whole
from tests.support import noise_image
from tilefan.local.stack import LocalStack, local_stack, run_job
from tilefan.state.jobs import JobStatus
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration

PREVIEW = {"tile_size": 256, "overlap": 0, "suffix": "jpeg"}


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with local_stack() as running:
        yield running


def run_tiff(
    stack: LocalStack, image: pyvips.Image, tmp_path: Path, tile_size: int, **options: Any
) -> dict[str, Any]:
    source = tmp_path / "source.png"
    image.pngsave(str(source))
    view = run_job(
        stack,
        source,
        tmp_path / "out.tif",
        BLUR,
        output_format="tiff",
        tile_size=tile_size,
        output_options={"preview": True, **options},  # run_job turns it off by default
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert view.job.output is not None
    return {"job_id": view.job.job_id, **view.job.output}


def preview_files(stack: LocalStack, job_id: str) -> dict[str, bytes]:
    """The preview's objects by the paths dzsave gives a set named ``out``."""
    store = stack.service.store
    prefix = keys.result_prefix(job_id) + "preview/"
    return {
        key.removeprefix(prefix).replace("result", "out", 1): store.get_bytes(key)
        for key in store.list_keys(prefix)
    }


@pytest.mark.parametrize(
    ("width", "height", "bands", "tile_size"),
    [(1100, 733, 3, 256), (901, 1203, 4, 512), (1537, 1031, 1, 1024), (200, 131, 3, 256)],
)
def test_the_preview_equals_dzsave_of_the_whole_result(
    stack: LocalStack, tmp_path: Path, width: int, height: int, bands: int, tile_size: int
) -> None:
    image = noise_image(width, height, bands, seed=width + bands)
    output = run_tiff(stack, image, tmp_path, tile_size)
    job_id = output["job_id"]
    assert output["preview"] == {
        "key": f"results/{job_id}/preview/result.dzi",
        "prefix": f"results/{job_id}/preview/result_files/",
    }
    expected = dzsave_files(whole(image, BLUR), tmp_path, "dzi", **PREVIEW)
    assert_same_tiles(expected, preview_files(stack, job_id))


def test_preview_off_writes_none(stack: LocalStack, tmp_path: Path) -> None:
    output = run_tiff(stack, noise_image(600, 400, 3, seed=2), tmp_path, 256, preview=False)
    assert "preview" not in output
    assert preview_files(stack, output["job_id"]) == {}


def test_a_16_bit_result_gets_no_preview_and_still_succeeds(
    stack: LocalStack, tmp_path: Path
) -> None:
    image = noise_image(600, 400, 3, seed=3).cast("ushort") * 200
    output = run_tiff(stack, image.cast("ushort"), tmp_path, 256)
    assert "preview" not in output
    assert preview_files(stack, output["job_id"]) == {}

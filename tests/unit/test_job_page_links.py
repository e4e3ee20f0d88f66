"""Job page links: a token opens one job's page, for its owner, until it expires."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import pyvips

from tilefan.formats.dz_tiles import TileSetLayout
from tilefan.service.job_page import PAGE_FILES, ViewedSet, ViewLinks, page_file
from tilefan.state.jobs import Job, JobStatus

pytestmark = pytest.mark.unit

LINKS = ViewLinks(b"a deployment's secret", 3600)


def test_a_token_opens_its_job_until_it_expires() -> None:
    token = LINKS.token("job-1", "owner-a", now=1000)
    expires = int(token.split(".")[0])
    assert 4600 <= expires < 4600 + 3600  # the lifetime, rounded up to a whole hour
    assert LINKS.opens(token, "job-1", "owner-a", now=1000)
    assert LINKS.opens(token, "job-1", "owner-a", now=expires)
    assert not LINKS.opens(token, "job-1", "owner-a", now=expires + 1)
    assert LINKS.token("job-1", "owner-a", now=1001) == token  # the same within the hour


@pytest.mark.parametrize(
    ("job_id", "owner", "links"),
    [
        ("job-2", "owner-a", LINKS),  # another job
        ("job-1", "owner-b", LINKS),  # the job re-created under another owner
        ("job-1", "owner-a", ViewLinks(b"another deployment", 3600)),
    ],
)
def test_a_token_opens_nothing_else(job_id: str, owner: str, links: ViewLinks) -> None:
    token = LINKS.token("job-1", "owner-a", now=1000)
    assert not links.opens(token, job_id, owner, now=1000)


def test_a_changed_token_opens_nothing() -> None:
    token = LINKS.token("job-1", "owner-a", now=1000)
    expires, mac = token.split(".")
    later = f"{int(expires) + 86_400}.{mac}"  # the expiry pushed out by hand
    flipped = f"{expires}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}"
    for forged in (later, flipped, "", ".", expires, f"x.{mac}", f"{'9' * 40}.{mac}"):
        assert not LINKS.opens(forged, "job-1", "owner-a", now=1000), forged


def test_only_the_pages_own_files_are_served() -> None:
    for name, content_type in PAGE_FILES.items():
        found = page_file(name)
        assert found is not None and found[0] == content_type and found[1]
    for name in ("../job_page.py", "job_page.py", "page/job.js", "", "JOB.JS"):
        assert page_file(name) is None


@pytest.mark.parametrize(
    ("output_format", "options", "root"),
    [
        ("dzi", {}, "result_files/"),
        ("iiif", {}, "result/"),
        ("dzi", {"tile_size": 64}, "result_files/"),
    ],
)
def test_the_viewers_tiles_are_the_files_dzsave_writes(
    tmp_path: Path, output_format: str, options: dict[str, Any], root: str
) -> None:
    width, height = 700, 300
    layout = TileSetLayout.from_options(output_format, options)
    image = pyvips.Image.black(width, height, bands=3)
    image.dzsave(str(tmp_path / "result"), **layout.dzsave_arguments())
    written = {
        str(path.relative_to(tmp_path))
        for path in tmp_path.rglob("*")
        if path.suffix in (".jpeg", ".jpg")
    }
    job = Job(
        job_id="j",
        owner="o",
        status=JobStatus.SUCCEEDED,
        operations=[],
        output_format=output_format,
        tile_size=256,
        created_at="",
        output_options=options,
        output={"prefix": root, "width": width, "height": height},
    )
    viewed = ViewedSet.of(job)
    assert viewed is not None
    source = viewed.viewer_source()
    assert source["max_level"] == 10  # 2**10 >= 700
    named = {
        viewed.tile_key(level, column, row)
        for level in range(source["min_level"], source["max_level"] + 1)
        for column in range(64)
        for row in range(64)
    } - {None}
    assert named == written
    for outside in ((source["min_level"] - 1, 0, 0), (11, 0, 0), (10, 64, 0)):
        assert viewed.tile_key(*outside) is None
    assert ViewedSet.of(dataclasses.replace(job, output_format="png")) is None

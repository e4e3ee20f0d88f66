"""Job page links: a token opens one job's page, for its owner, until it expires."""

from __future__ import annotations

import pytest

from tilefan.service.job_page import PAGE_FILES, ViewLinks, page_file

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

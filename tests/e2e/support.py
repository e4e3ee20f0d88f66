"""What the end-to-end tests share: a served API with settings, raw requests, jobs made quickly."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tilefan.local.serve import LocalApi, serve_api
from tilefan.service.client import Submission, TilefanClient

POLL_SECONDS = 0.05
"""Seconds between status polls: the jobs here are small, so waiting longer only slows tests."""

ROUTES = [
    ("GET", "/jobs/{id}", None),
    ("GET", "/jobs/{id}/tiles", None),
    ("GET", "/jobs/{id}/progress.svg", None),
    ("GET", "/jobs/{id}/result", None),
    ("GET", "/jobs/{id}/result?redirect=false", None),
    ("POST", "/jobs/{id}/start", None),
    ("POST", "/jobs/{id}/upload/complete", b'{"parts": [{"part_number": 1, "etag": "x"}]}'),
    ("DELETE", "/jobs/{id}", None),
]
"""Every route about one job, with a body where the route needs one to get past validation."""


@contextmanager
def serving(keys: Iterable[str], settings: Mapping[str, str]) -> Iterator[LocalApi]:
    """`tilefan serve` on a free loopback port, with these environment settings while it runs."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        with serve_api(port=0, keys=keys) as running:
            yield running


def raw(
    api: LocalApi, method: str, path: str, key: str | None, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    """One request with exact bytes and path, for what a well-behaved client never sends.

    Returns the status and the JSON answer; a key of None sends no x-api-key header.
    """
    headers = {"Content-Type": "application/json"}
    if key:
        headers["x-api-key"] = key
    request = urllib.request.Request(api.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "{}")


NO_PREVIEW = {"preview": False}
"""The output options of the jobs here: a preview would round their 64-pixel output tiles up
to whole 256-pixel preview tiles, and these tests count tiles."""


def create(client: TilefanClient, size: int, **body: Any) -> Any:
    """Create an inverting PNG job for an upload of `size` bytes; `body` overrides any field."""
    document = {
        "operations": [{"op": "invert"}],
        "output": {"format": "png", **NO_PREVIEW},
        "tile_size": 64,
        "input": {"size_bytes": size},
        **body,
    }
    return client.request("POST", "/jobs", document)


def submit(
    client: TilefanClient,
    source: Path,
    output: Path,
    *,
    operations: list[dict[str, Any]] | None = None,
    tile_size: int = 64,
    on_progress: Callable[[Mapping[str, Any]], None] | None = None,
) -> Submission:
    """Run one job to its PNG result (inverting unless told otherwise) and download it."""
    return client.submit(
        source,
        output,
        operations or [{"op": "invert"}],
        output_format="png",
        tile_size=tile_size,
        output_options=NO_PREVIEW,
        on_progress=on_progress,
        poll_seconds=POLL_SECONDS,
    )


def wait_until_ended(client: TilefanClient, job_id: str) -> Any:
    """The job's document once it has ended, whichever way it ended."""
    return client.follow(job_id, on_progress=None, poll_seconds=POLL_SECONDS)


def assert_invisible(api: LocalApi, job_id: str, key: str, *context: str) -> None:
    """Every route answers this key 404 JOB_NOT_FOUND about the job, as if it did not exist."""
    for method, route, body in ROUTES:
        status, answer = raw(api, method, route.format(id=job_id), key, body)
        assert (status, answer.get("code")) == (404, "JOB_NOT_FOUND"), (*context, method, route)

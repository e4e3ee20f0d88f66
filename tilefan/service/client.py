"""A client of the REST API for any deployment, local or on AWS: what `tilefan submit` does."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from tilefan.errors import TilefanError

__all__ = ["ApiError", "JobFailed", "Submission", "TilefanClient"]

ProgressCallback = Callable[[Mapping[str, Any]], None]
_TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
_PARTS_PER_REQUEST = 100
"""Part URLs asked for at once: the most `POST /jobs/{id}/upload/parts` signs."""


class ApiError(TilefanError):
    """The API answered with an error document."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message


class JobFailed(TilefanError):
    """The job ended without a result."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Submission:
    """A finished job: its final status document and where the result was saved."""

    job: Mapping[str, Any]
    output: Path


class TilefanClient:
    """Talks to one deployment's API with one API key."""

    def __init__(self, api_url: str, key: str | None = None, *, timeout: float = 60) -> None:
        self.api_url = api_url.rstrip("/")
        self.key = key
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call; raises `ApiError` with the API's code and sentence on an error."""
        url = path if path.startswith("http") else f"{self.api_url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        if self.key:
            all_headers["x-api-key"] = self.key
        request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            raise _api_error(e) from e
        return json.loads(text) if text else None

    def submit(
        self,
        source: Path,
        output: Path,
        operations: list[dict[str, Any]],
        *,
        output_format: str,
        tile_size: int | None = None,
        output_options: Mapping[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
        poll_seconds: float = 1.0,
    ) -> Submission:
        """Create, upload, start, follow and download one job (``output_options`` go in its
        ``output`` beside the format)."""
        body: dict[str, Any] = {
            "operations": operations,
            "output": {"format": output_format, **(output_options or {})},
            "input": {"size_bytes": source.stat().st_size},
        }
        if tile_size is not None:
            body["tile_size"] = tile_size
        created = self.request("POST", "/jobs", body, {"Idempotency-Key": uuid.uuid4().hex})
        job_id = created["job_id"]
        self.upload(source, created)
        self.request("POST", f"/jobs/{job_id}/start")
        job = self.follow(job_id, on_progress=on_progress, poll_seconds=poll_seconds)
        if job["status"] != "SUCCEEDED":
            error = job.get("error") or {"code": job["status"], "message": "the job did not finish"}
            raise JobFailed(error["code"], error["message"])
        self.download(job_id, output)
        return Submission(job, output)

    def upload(self, source: Path, created: Mapping[str, Any]) -> None:
        """Send the file where `POST /jobs` said: one PUT, or parts then completion."""
        if created.get("upload"):
            upload = created["upload"]
            with source.open("rb") as stream:
                _put(upload["url"], stream, source.stat().st_size, upload.get("headers", {}))
            return
        multipart = created["multipart"]
        size, part_size = source.stat().st_size, int(multipart["part_size"])
        # The job came with the first parts' URLs; the others are signed a batch at a time,
        # just before their upload, so no URL expires while earlier parts are still uploading.
        urls = {part["part_number"]: part["url"] for part in multipart["parts"]}
        last = int(multipart["part_count"])
        parts = []
        with source.open("rb") as stream:
            for number in range(1, last + 1):
                if number not in urls:
                    batch = list(range(number, min(number + _PARTS_PER_REQUEST - 1, last) + 1))
                    signed = self.request(
                        "POST", self.link(multipart["parts_url"]), {"part_numbers": batch}
                    )
                    urls = {part["part_number"]: part["url"] for part in signed["parts"]}
                offset = (number - 1) * part_size
                stream.seek(offset)
                chunk = stream.read(min(part_size, size - offset))
                etag = _put(urls[number], chunk, len(chunk), {})
                parts.append({"part_number": number, "etag": etag})
        self.request("POST", self.link(multipart["complete_url"]), {"parts": parts})

    def link(self, href: str) -> str:
        """A link from the API (root-relative, stage included) as a full URL."""
        return urljoin(self.api_url + "/", href)

    def follow(
        self, job_id: str, *, on_progress: ProgressCallback | None, poll_seconds: float
    ) -> Mapping[str, Any]:
        """Poll the job until it ends; returns its last status document."""
        while True:
            job: Mapping[str, Any] = self.request("GET", f"/jobs/{job_id}")
            if on_progress is not None:
                on_progress(job)
            if job["status"] in _TERMINAL:
                return job
            time.sleep(poll_seconds)

    def download(self, job_id: str, output: Path) -> None:
        """Fetch the result through its short-lived URL."""
        link = self.request("GET", f"/jobs/{job_id}/result?redirect=false")
        with (
            urllib.request.urlopen(link["url"], timeout=self.timeout) as response,
            output.open("wb") as sink,
        ):
            shutil.copyfileobj(response, sink, 4 * 2**20)


def _put(url: str, data: Any, length: int, headers: Mapping[str, str]) -> str:
    request = urllib.request.Request(
        url, data=data, method="PUT", headers={**headers, "Content-Length": str(length)}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return str(response.headers.get("ETag", ""))
    except urllib.error.HTTPError as e:
        raise ApiError(e.code, "UPLOAD_REFUSED", e.read().decode(errors="replace")[:300]) from e


def _api_error(error: urllib.error.HTTPError) -> ApiError:
    text = error.read().decode(errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = {}
    code = str(document.get("code") or "HTTP_ERROR")
    message = str(document.get("message") or text[:300] or error.reason)
    return ApiError(error.code, code, message)

"""`tilefan serve --data-dir`: jobs, objects and API keys kept across restarts of the server.

moto keeps everything in the process, so the server saves what a restart needs when it stops
and loads it when it starts: every table item (jobs, tiles, idempotency records) as DynamoDB
JSON, every upload and result object as a file, and the API keys it accepted. Intermediates
(``jobs/<id>/``) are not kept: a job that was running when the server stopped cannot go on (its
execution lived in the process), so on restart it ends FAILED with ``ENGINE_RESTARTED``, as
the pipeline's Abort would have ended it, and its intermediates are gone with the process.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tilefan.local.stack import LocalStack
from tilefan.state.jobs import JobStatus

__all__ = ["ENGINE_RESTARTED", "DataDir", "Restored", "default_data_dir"]

ENGINE_RESTARTED: Final = "ENGINE_RESTARTED"
_RUNNING: Final = frozenset(
    {JobStatus.QUEUED, JobStatus.SPLITTING, JobStatus.PROCESSING, JobStatus.MERGING}
)
_KEPT_PREFIXES: Final = ("uploads/", "results/")
"""What outlives a job's run (``tilefan.state.storage.keys``); ``jobs/`` holds intermediates."""


def default_data_dir() -> Path:
    """Where `tilefan serve` keeps its state unless told: the user's data directory."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tilefan" / "serve"


@dataclass(frozen=True)
class Restored:
    """What a start found in the data directory."""

    items: int
    objects: int
    failed_jobs: tuple[str, ...]


class DataDir:
    """The files that hold a server's state between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().resolve()
        self._items = self.path / "table.jsonl"
        self._objects = self.path / "objects"
        self._keys = self.path / "api-keys.json"

    def api_keys(self, given: Iterable[str], make_key: Callable[[], str]) -> tuple[str, ...]:
        """The keys given, or the ones kept from before, or a new one (then kept)."""
        chosen = tuple(given)
        if not chosen and self._keys.is_file():
            chosen = tuple(json.loads(self._keys.read_text()))
        if not chosen:
            chosen = (make_key(),)
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_private(self._keys, json.dumps(list(chosen)))
        return chosen

    def restore(self, stack: LocalStack) -> Restored:
        """Load the saved items and objects; end the jobs that were running as FAILED."""
        engine = stack.engine
        dynamodb = engine.client("dynamodb")
        count = 0
        if self._items.is_file():
            with self._items.open() as lines:
                for line in lines:
                    item = _decode(json.loads(line))
                    dynamodb.put_item(TableName=engine.table, Item=item)
                    count += 1
        objects = 0
        if self._objects.is_dir():
            for path in sorted(self._objects.rglob("*")):
                if path.is_file():
                    key = path.relative_to(self._objects).as_posix()
                    stack.service.store.upload(path, key, "application/octet-stream")
                    objects += 1
        failed = []
        jobs = stack.service.jobs
        for job_id in self._job_ids():
            job = jobs.get(job_id)
            if job.status in _RUNNING:
                jobs.transition(
                    job_id,
                    JobStatus.FAILED,
                    allowed_from=set(_RUNNING),
                    error={
                        "code": ENGINE_RESTARTED,
                        "message": "the server stopped while the job was running; start a new job",
                    },
                )
                failed.append(job_id)
        return Restored(count, objects, tuple(failed))

    def save(self, stack: LocalStack) -> None:
        """Write every table item and every kept object, replacing what was saved before."""
        engine = stack.engine
        self.path.mkdir(parents=True, exist_ok=True)
        paginator = engine.client("dynamodb").get_paginator("scan")
        staged = self._items.with_suffix(".tmp")
        with staged.open("w") as out:
            for page in paginator.paginate(TableName=engine.table, ConsistentRead=True):
                for item in page["Items"]:
                    out.write(json.dumps(_encode(item)) + "\n")
        os.replace(staged, self._items)
        objects = self.path / "objects.tmp"
        shutil.rmtree(objects, ignore_errors=True)
        store = stack.service.store
        for prefix in _KEPT_PREFIXES:
            for key in store.list_keys(prefix):
                (objects / key).parent.mkdir(parents=True, exist_ok=True)
                store.download(key, objects / key)
        shutil.rmtree(self._objects, ignore_errors=True)
        if objects.is_dir():
            objects.rename(self._objects)

    def _job_ids(self) -> list[str]:
        if not self._items.is_file():
            return []
        found = []
        with self._items.open() as lines:
            for line in lines:
                item = json.loads(line)
                if item.get("sk", {}).get("S") == "JOB" and item["pk"]["S"].startswith("JOB#"):
                    found.append(item["pk"]["S"].removeprefix("JOB#"))
        return found

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(text)


def _encode(value: Any) -> Any:
    """DynamoDB JSON as JSON text can hold it: binary values as base64."""
    if isinstance(value, bytes):
        return {"__b64__": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {name: _encode(inner) for name, inner in value.items()}
    if isinstance(value, list):
        return [_encode(inner) for inner in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__b64__"}:
            return base64.b64decode(value["__b64__"])
        return {name: _decode(inner) for name, inner in value.items()}
    if isinstance(value, list):
        return [_decode(inner) for inner in value]
    return value

"""Running whole jobs on the embedded engine: what `tilefan run` and `tilefan demo` do."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from tilefan.errors import TilefanError
from tilefan.formats.source import open_checked, upright
from tilefan.local.engine import REGION, EmbeddedEngine, LambdaHandler
from tilefan.service.job_service import JobService, JobView
from tilefan.settings import Settings
from tilefan.state.jobs import TERMINAL, JobRepository, JobStatus
from tilefan.state.storage import TileStore, keys

__all__ = ["LOCAL_OWNER", "LocalStack", "download_result", "local_stack", "run_job"]

LOCAL_OWNER = "local"
"""The owner of jobs started from the command line."""

ProgressCallback = Callable[[JobView], None]

_DOWNLOADS = 16
"""A tile set's tiles downloaded at once."""


@dataclass(frozen=True)
class LocalStack:
    """The embedded engine with the service objects bound to it."""

    engine: EmbeddedEngine
    service: JobService

    def settle(self, job_id: str, *, timeout: float = 600) -> None:
        """Wait until the job's execution has ended, not only its status.

        The job item ends before its execution does: a job is marked SUCCEEDED or FAILED
        first and its intermediates removed after, so that a late tile worker finds the job
        ended and removes what it wrote.
        """
        execution_arn = self.service.jobs.get(job_id).execution_arn
        if execution_arn:
            self.engine.wait(execution_arn, timeout=timeout)


@contextmanager
def local_stack(
    *,
    server: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    handlers: Mapping[str, LambdaHandler] | None = None,
    parameters: Mapping[str, str] | None = None,
    function_properties: Mapping[str, Mapping[str, Any]] | None = None,
    processes: bool = False,
    environments: Mapping[str, int] | None = None,
    warm: Mapping[str, int] | None = None,
    function_logs: bool = True,
    background_nice: int = 0,
) -> Iterator[LocalStack]:
    """Start the embedded engine and the job service over it (``EmbeddedEngine``'s arguments)."""
    with EmbeddedEngine(
        server=server or processes,
        host=host,
        port=port,
        handlers=handlers,
        parameters=parameters,
        function_properties=function_properties,
        processes=processes,
        environments=environments,
        warm=warm,
        function_logs=function_logs,
        background_nice=background_nice,
    ) as engine:
        settings = Settings(
            bucket=engine.bucket,
            table=engine.table,
            state_machine_arn=engine.state_machine_arn,
            cleanup_function=engine.template.environment()["TILEFAN_CLEANUP_FUNCTION"],
        )
        resource = boto3.resource("dynamodb", region_name=REGION, endpoint_url=engine.endpoint_url)
        service = JobService(
            settings,
            jobs=JobRepository(engine.table, resource=resource),
            store=TileStore(engine.bucket, client=engine.client("s3")),
            stepfunctions=engine.client("stepfunctions"),
            # boto3's default session: the engine answers its Invoke with the template's handler.
            functions=boto3.client("lambda", region_name=REGION),
        )
        yield LocalStack(engine, service)


def _dimensions(source: Path) -> dict[str, int]:
    """The input's upright width and height from its header, so that creation can refuse a
    result that cannot be made; nothing when the header does not read (the splitter says why)."""
    try:
        image = upright(open_checked(source))
    except TilefanError:
        return {}
    return {"width": image.width, "height": image.height}


def run_job(
    stack: LocalStack,
    source: Path,
    output: Path,
    operations: Any,
    *,
    output_format: str,
    tile_size: int | None = None,
    concurrency: int = 4,
    output_options: Mapping[str, Any] | None = None,
    on_progress: ProgressCallback | None = None,
    poll_seconds: float = 0.25,
    progress_seconds: float = 1.0,
    timeout: float = 3600,
) -> JobView:
    """Create, upload, start and follow one job; download its result when it succeeds.

    No job page shows a job run here, so its result gets no preview unless asked for.
    """
    service = stack.service
    job = service.create(
        LOCAL_OWNER,
        operations,
        output_format,
        tile_size=tile_size,
        output_options={"preview": False, **(output_options or {})},
        input_info={"size_bytes": source.stat().st_size, **_dimensions(source)},
    )
    service.store.upload(source, keys.upload(job.job_id), "application/octet-stream")
    service.start(LOCAL_OWNER, job.job_id, max_concurrency=concurrency)
    deadline = time.monotonic() + timeout
    shown = -math.inf
    while True:
        # The job item says when the job ends. Tile progress reads the band items too (a
        # second request that competes with the job for moto), so it is read at most once
        # every progress_seconds, and once more at the end.
        status = service.jobs.get(job.job_id).status
        if on_progress is not None and (
            status in TERMINAL or time.monotonic() - shown >= progress_seconds
        ):
            on_progress(service.view(LOCAL_OWNER, job.job_id))
            shown = time.monotonic()
        if status in TERMINAL:
            break
        if time.monotonic() > deadline:
            service.cancel(LOCAL_OWNER, job.job_id)
            break
        time.sleep(poll_seconds)
    stack.settle(job.job_id, timeout=max(deadline - time.monotonic(), 60))
    view = service.view(LOCAL_OWNER, job.job_id)
    if view.job.status is JobStatus.SUCCEEDED and view.job.output:
        download_result(service.store, view.job.output, output)
    return view


def download_result(store: TileStore, result: Mapping[str, Any], output: Path) -> None:
    """A result to local disk: a file, or a tile set as ``output`` (a ``.dzi`` and its
    ``_files`` folder beside it, or an IIIF folder holding ``info.json``)."""
    if "prefix" not in result:
        store.download(result["key"], output)
        return
    prefix = result["prefix"]
    if result["format"] == "iiif":
        folder = output  # the prefix holds info.json too
    else:
        store.download(result["key"], output)
        folder = output.with_name(f"{output.stem}_files")

    def fetch(key: str) -> None:
        target = folder / key.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download(key, target)

    with ThreadPoolExecutor(_DOWNLOADS) as pool:
        list(pool.map(fetch, store.list_keys(prefix)))

"""Abort: mark a failed job FAILED with a code and a sentence, and clean up."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tilefan.errors import TileFailed, TilefanError, TransientError
from tilefan.state.jobs import (
    JobStatus,
    TileState,
)
from tilefan.state.storage import ObjectMissing, keys

if TYPE_CHECKING:
    from tilefan.stages.pipeline import Pipeline


_ERROR_CODES: dict[str, str] = {}


def _register_codes(cls: type[TilefanError]) -> None:
    _ERROR_CODES[cls.__name__] = cls.code
    for sub in cls.__subclasses__():
        _register_codes(sub)


def describe_failure(error: Mapping[str, Any] | None) -> tuple[str, str]:
    """A code and a sentence from a Step Functions error (``{"Error": ..., "Cause": ...}``)."""
    if not _ERROR_CODES:
        _register_codes(TilefanError)
    name = str((error or {}).get("Error", ""))
    cause = str((error or {}).get("Cause", ""))
    try:
        message = str(json.loads(cause).get("errorMessage", cause))
    except (ValueError, AttributeError):
        message = cause
    if name in _ERROR_CODES:
        return _ERROR_CODES[name], message
    if name in ("States.Timeout", "Sandbox.Timedout"):  # the state's limit, or Lambda's
        return "TIMEOUT", "a stage of the job ran out of time"
    # An error no stage names (a bug): its type and message say where to look.
    detail = f"{name}: {message}" if name and message else name or message or "unknown"
    return "INTERNAL_ERROR", f"the job stopped on an internal error ({_shortened(detail)})"


def _shortened(text: str, most: int = 300) -> str:
    """One line (a libvips message spans several) of at most ``most`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= most else line[: most - 3] + "..."


def abort(pipeline: Pipeline, job_id: str, error: Mapping[str, Any] | None) -> dict[str, Any]:
    """Mark the job FAILED with a code and a sentence, and remove its intermediates."""
    code, message = describe_failure(error)
    if code == "INTERNAL_ERROR":
        # A failed Distributed Map reports only that its threshold was crossed; the tile's
        # own error is in its record.
        code, message = (
            _tile_failure(pipeline, job_id)
            # A statistics pass's tile, or a second fan-out's task: stages with no tile
            # record to fail, which store their sentence instead.
            or _stored_failure(pipeline, keys.statistics_failure(job_id))
            or _stored_failure(pipeline, keys.fanout_failure(job_id))
            or (code, message)
        )
    ended = pipeline.jobs.finish_failed(job_id, code, message)
    removed = pipeline.discard_if_ended(job_id)
    return {"status": JobStatus.FAILED.value, "code": code, "ended": ended, "removed": removed}


def _stored_failure(pipeline: Pipeline, key: str) -> tuple[str, str] | None:
    """The code and sentence a stage stored at ``key`` when it failed, if it did."""
    try:
        failure = pipeline.store.get_json(key)
    except ObjectMissing:
        return None
    return str(failure["code"]), str(failure["message"])


def _tile_failure(pipeline: Pipeline, job_id: str) -> tuple[str, str] | None:
    """The code and sentence of the tile that failed the Map, from the tile records."""
    grid = pipeline.jobs.get(job_id).grid
    if grid is None:  # never split: no tile records
        return None
    records = pipeline.jobs.tiles(job_id, int(grid["tile_count"]), consistent=True)
    failed = next((r for r in records if r.state is TileState.FAILED), None)
    if failed is not None:
        return TileFailed.code, failed.error or f"tile {failed.index} failed"
    # A tile still RUNNING after the Map ended lost its worker: a transient error that
    # outlasted the retries (recorded), or an invocation that died without an answer, such
    # as a Lambda timeout or running out of memory (nothing recorded).
    running = [r for r in records if r.state is TileState.RUNNING]
    stuck = next((r for r in running if r.error), running[0] if running else None)
    if stuck is None:
        return None
    if stuck.error:
        return TransientError.code, (
            f"{stuck.error} (still failing after {stuck.attempts} attempts)"
        )
    return TileFailed.code, (
        f"tile {stuck.index}: its worker stopped before finishing it (it ran out of time or memory)"
    )

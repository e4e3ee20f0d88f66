"""The pipeline's stages: split, process a batch of tiles, merge, abort. No Lambda events here."""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pyvips

from tilefan.errors import InvalidTileSize, TileFailed, TilefanError, TransientError, reason
from tilefan.execute import execute_tile
from tilefan.jobs import (
    MAX_TILES,
    TERMINAL,
    InvalidTransition,
    JobRepository,
    JobStatus,
    TileState,
)
from tilefan.operations import Chain, parse_chain
from tilefan.outputs import save_output
from tilefan.plan import ImageSpec, Tile, TilePlan, plan_tiles
from tilefan.settings import Settings
from tilefan.source import decode_to_scratch, open_checked
from tilefan.storage import TileStore, keys

__all__ = ["Pipeline", "describe_failure"]

_IO_THREADS = 16
"""Concurrent S3 transfers in the splitter and merger: latency-bound, not CPU-bound."""

_MAX_OPEN_FILES = 256
"""The merger joins at most this many cell or strip files at once (Lambda has 1,024 descriptors)."""

_CELL_PIXELS = 8 * 2**20
"""Pixels of output tiles the merger holds in memory at once: a cell, written to one file."""

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
    return "INTERNAL_ERROR", f"the job stopped on an internal error ({name or 'unknown'})"


class Pipeline:
    """The stages of one deployment: its job table, its bucket and its settings."""

    def __init__(self, settings: Settings, *, jobs: JobRepository, store: TileStore) -> None:
        self.settings = settings
        self.jobs = jobs
        self.store = store

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Pipeline:
        """Build the stages with default AWS clients, once per process."""
        settings = settings or Settings()
        return cls(
            settings,
            jobs=JobRepository(
                settings.table, resource=boto3.resource("dynamodb"), ttl_days=settings.job_ttl_days
            ),
            store=TileStore(
                settings.bucket, client=boto3.client("s3"), compression=settings.tile_encoding
            ),
        )

    # --- split --------------------------------------------------------------------------------

    def split(self, job_id: str) -> dict[str, Any]:
        """Decode the upload once, cut the source tiles, write the manifest and the tile items."""
        started = time.monotonic()
        job = self.jobs.get(job_id)
        self.jobs.transition(
            job_id, JobStatus.SPLITTING, allowed_from={JobStatus.QUEUED, JobStatus.SPLITTING}
        )
        chain = parse_chain(job.operations)
        with tempfile.TemporaryDirectory(dir=self.settings.scratch_dir) as scratch:
            upload = Path(scratch) / "upload"
            self.store.download(keys.upload(job_id), upload)
            header = open_checked(
                upload,
                max_pixels=self.settings.max_pixels,
                max_pixels_per_byte=self.settings.max_pixels_per_byte,
                access="sequential",
            )
            source = decode_to_scratch(header, Path(scratch) / "source.v")
            spec = ImageSpec.of(source)
            plan = plan_tiles(spec, chain, job.tile_size)
            if plan.tile_count > MAX_TILES:
                raise InvalidTileSize(
                    f"tile_size {job.tile_size} cuts this image into {plan.tile_count:,} tiles; "
                    f"at most {MAX_TILES:,} are supported, so use a larger tile size"
                )
            with ThreadPoolExecutor(_IO_THREADS) as pool:
                sizes = list(
                    pool.map(
                        lambda tile: self.store.put_tile(
                            job_id,
                            "src",
                            tile.index,
                            source.crop(*tile.source),
                            # The output takes its metadata from tile 0 (libvips' joins keep
                            # the first image's); an ICC profile or XMP of megabytes copied
                            # into every tile would multiply the bytes moved by the tile count.
                            metadata=tile.index == 0,
                        ),
                        plan.tiles(),
                    )
                )
        manifest = plan.manifest(self.settings.tiles_per_item)
        for item in manifest:
            item["job_id"] = job_id
        self.store.put_json(keys.manifest(job_id), manifest)
        self.jobs.create_tiles(job_id, plan.tile_count)
        try:
            self.jobs.transition(
                job_id,
                JobStatus.PROCESSING,
                allowed_from={JobStatus.SPLITTING},
                source=asdict(spec),
                grid=_grid(plan, bytes_split=sum(sizes)),
                t_split=time.monotonic() - started,
            )
        except InvalidTransition:
            self._discard_if_ended(job_id)
            raise
        return {
            "manifest_key": keys.manifest(job_id),
            "tile_count": plan.tile_count,
            "batch_count": len(manifest),
        }

    # --- tiles --------------------------------------------------------------------------------

    def process_batch(self, job_id: str, tiles: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Run the chain on each tile of one manifest item; a done tile is not done again."""
        job = self.jobs.get(job_id)
        if job.status in TERMINAL or job.source is None or job.grid is None:
            return {"processed": 0, "skipped": len(tiles)}
        chain = _parsed_chain(json.dumps(job.operations, sort_keys=True))
        spec = ImageSpec(**job.source)
        processed = 0
        try:
            for compact in tiles:
                tile = Tile.from_compact(compact)
                if not self.jobs.tile_started(job_id, tile.index):
                    continue
                self._process_tile(job_id, tile, chain, spec, job.grid["interpretation"])
                processed += 1
        finally:
            # Also when a tile failed: a cancellation removes the source tiles under us.
            self._discard_if_ended(job_id)
        return {"processed": processed, "skipped": len(tiles) - processed}

    def _process_tile(
        self, job_id: str, tile: Tile, chain: Any, spec: ImageSpec, interpretation: str
    ) -> None:
        started = time.monotonic()
        try:
            block = self.store.get_tile(job_id, "src", tile.index, spec.interpretation)
            result = execute_tile(chain, spec, block, tile.output)
            self.store.put_tile(
                job_id,
                "out",
                tile.index,
                result.copy(interpretation=interpretation),
                metadata=tile.index == 0,
            )
        except TransientError as e:
            # Retried by the state machine; kept on the tile in case the retries run out.
            self.jobs.tile_retrying(job_id, tile.index, f"tile {tile.index}: {e}")
            raise
        except (pyvips.Error, TilefanError) as e:
            message = f"tile {tile.index}: {reason(e)}"
            self.jobs.tile_finished(job_id, tile.index, _ms_since(started), error=message)
            raise TileFailed(message) from e
        self.jobs.tile_finished(job_id, tile.index, _ms_since(started))

    # --- merge --------------------------------------------------------------------------------

    def merge(self, job_id: str) -> dict[str, Any]:
        """Assemble the output tiles strip by strip, save, upload, and mark the job SUCCEEDED."""
        started = time.monotonic()
        job = self.jobs.get(job_id)
        if job.grid is None or job.source is None:
            raise TilefanError(f"job {job_id} has no tile grid: it was never split")
        # The map stage ran from the PROCESSING transition until now; a retried merge keeps
        # the figure the first attempt recorded.
        timing = (
            {"t_process": _seconds_since_iso(job.updated_at)}
            if job.status is JobStatus.PROCESSING
            else {}
        )
        self.jobs.transition(
            job_id,
            JobStatus.MERGING,
            allowed_from={JobStatus.PROCESSING, JobStatus.MERGING},
            **timing,
        )
        progress = self.jobs.progress(job_id, job.grid["tile_count"])
        if progress.done != progress.total:
            raise TilefanError(
                f"{progress.total - progress.done} of {progress.total} tiles are not done"
            )
        plan = plan_tiles(ImageSpec(**job.source), parse_chain(job.operations), job.tile_size)
        with tempfile.TemporaryDirectory(dir=self.settings.scratch_dir) as scratch:
            image = self._join_cells(job_id, plan, Path(scratch), job.grid["interpretation"])
            saved = save_output(image, Path(scratch), job.output_format, job.output_options)
            key = keys.result(job_id, saved.extension)
            self.store.upload(saved.path, key, saved.content_type)
            output = {
                "key": key,
                "format": job.output_format,
                "size_bytes": saved.path.stat().st_size,
                "width": plan.output_width,
                "height": plan.output_height,
                "bands": image.bands,
                "pixel_format": image.format,
            }
        try:
            self.jobs.transition(
                job_id,
                JobStatus.SUCCEEDED,
                allowed_from={JobStatus.MERGING},
                output=output,
                t_merge=time.monotonic() - started,
            )
        except InvalidTransition:
            self._discard_if_ended(job_id)
            raise
        self.store.delete_prefix(keys.job_prefix(job_id))
        return {"status": JobStatus.SUCCEEDED.value, "output_key": key}

    def _join_cells(
        self, job_id: str, plan: TilePlan, scratch: Path, interpretation: str
    ) -> pyvips.Image:
        """The output image over cell files on disk, each a few tiles of one row.

        Only one cell's tiles are in memory at a time, so what the merger holds does not grow
        with the image's width, and every pixel is written to scratch once. Cells widen when
        the grid would need more files open than the merger may have; with more rows than
        that, a cell is a whole row.
        """
        cells_per_row = max(1, _MAX_OPEN_FILES // plan.rows)
        across = max(
            1,
            min(_IO_THREADS, _CELL_PIXELS // plan.tile_size**2),
            math.ceil(plan.columns / cells_per_row),
        )
        grid: list[list[Path]] = []
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            for row in range(plan.rows):
                cells = []
                for column in range(0, plan.columns, across):
                    first = row * plan.columns + column
                    indices = range(first, first + min(across, plan.columns - column))
                    tiles = list(
                        pool.map(
                            lambda i: self.store.get_tile(job_id, "out", i, interpretation),
                            indices,
                        )
                    )
                    path = scratch / f"cell-{row:06d}-{column:06d}.v"
                    _join(tiles, across=True).write_to_file(str(path))
                    cells.append(path)
                grid.append(cells)
        return _join_grid(grid, scratch).copy(interpretation=interpretation)

    # --- failure ------------------------------------------------------------------------------

    def abort(self, job_id: str, error: Mapping[str, Any] | None) -> dict[str, Any]:
        """Mark the job FAILED with a code and a sentence, and remove its intermediates."""
        code, message = describe_failure(error)
        if code == "INTERNAL_ERROR":
            # A failed Distributed Map reports only that its threshold was crossed; the tile's
            # own error is in its record.
            code, message = self._tile_failure(job_id) or (code, message)
        ended = self.jobs.finish_failed(job_id, code, message)
        removed = self._discard_if_ended(job_id)
        return {"status": JobStatus.FAILED.value, "code": code, "ended": ended, "removed": removed}

    def _discard_if_ended(self, job_id: str) -> int:
        """Remove what the stages wrote for a job that has ended; returns how many objects went.

        Intermediates go whatever the ending. A result goes unless the job SUCCEEDED with it: a
        merge that failed after uploading, or was cancelled meanwhile, must not leave a result
        that no job serves. A cancelled execution is stopped and runs no Abort, so each stage
        calls this itself when it finds the job ended under it.
        """
        status = self.jobs.get(job_id).status
        if status not in TERMINAL:
            return 0
        removed = self.store.delete_prefix(keys.job_prefix(job_id))
        if status is not JobStatus.SUCCEEDED:
            removed += self.store.delete_prefix(keys.result_prefix(job_id))
        return removed

    def _tile_failure(self, job_id: str) -> tuple[str, str] | None:
        """The code and sentence of the tile that failed the Map, from the tile records."""
        records = sorted(self.jobs.tiles(job_id), key=lambda record: record.index)
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
            f"tile {stuck.index}: its worker stopped before finishing it (it ran out of time "
            "or memory)"
        )


def _grid(plan: TilePlan, *, bytes_split: int) -> dict[str, Any]:
    return {
        "rows": plan.rows,
        "columns": plan.columns,
        "tile_count": plan.tile_count,
        "output_tile": plan.output_tile,
        "output_width": plan.output_width,
        "output_height": plan.output_height,
        "interpretation": plan.output_interpretation,
        "bytes_split": bytes_split,
    }


def _join(images: Sequence[pyvips.Image], *, across: bool) -> pyvips.Image:
    """Images side by side or stacked; only the last may be narrower or shorter."""
    if across:
        width, height = sum(image.width for image in images), images[0].height
    else:
        width, height = images[0].width, sum(image.height for image in images)
    # arrayjoin spaces cells by the largest; only the last is smaller, so crop.
    joined = pyvips.Image.arrayjoin(images, across=len(images) if across else 1)
    return joined.crop(0, 0, width, height)


def _join_grid(grid: Sequence[Sequence[Path]], scratch: Path) -> pyvips.Image:
    """A grid of cell files as one image: at most `_MAX_OPEN_FILES` cells, or one per row."""
    if len(grid) > _MAX_OPEN_FILES:
        return _stack_files([row[0] for row in grid], scratch)
    cells = [[pyvips.Image.new_from_file(str(path)) for path in row] for row in grid]
    return _join([_join(row, across=True) for row in cells], across=False)


def _stack_files(paths: Sequence[Path], scratch: Path) -> pyvips.Image:
    """Stack image files, merging groups first so few files are open at once."""
    if len(paths) <= _MAX_OPEN_FILES:
        return _join([pyvips.Image.new_from_file(str(path)) for path in paths], across=False)
    merged = []
    for start in range(0, len(paths), _MAX_OPEN_FILES):
        # Named after its first file, so no two groups or levels share a name.
        path = scratch / f"{paths[start].stem}-group.v"
        _stack_files(paths[start : start + _MAX_OPEN_FILES], scratch).write_to_file(str(path))
        merged.append(path)
    return _stack_files(merged, scratch)


@functools.lru_cache(maxsize=64)
def _parsed_chain(operations: str) -> Chain:
    """A job's chain, validated once per process rather than once per batch.

    Validation builds the operations' JSON schema (tens of milliseconds), which a warm worker
    would otherwise pay on every manifest item. A `Chain` is an immutable tuple of frozen
    steps, so one instance can serve every batch and thread.
    """
    return parse_chain(json.loads(operations))


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _seconds_since_iso(stamp: str) -> float:
    if not stamp:
        return 0.0
    return max(0.0, (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds())

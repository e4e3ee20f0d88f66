"""The pipeline's stages: split, process a batch of tiles, merge, abort. No Lambda events here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import boto3
from botocore.config import Config

from tilefan.settings import Settings
from tilefan.stages import (
    abort,
    cleanup,
    compaction,
    merge,
    process,
    second_fanout,
    split,
    statistics,
)
from tilefan.state.jobs import (
    TERMINAL,
    JobRepository,
    JobStatus,
)
from tilefan.state.multipart import CONNECTIONS, abort_uploads
from tilefan.state.storage import TileStore, keys

__all__ = ["Pipeline"]


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
                settings.bucket,
                client=boto3.client("s3", config=Config(max_pool_connections=CONNECTIONS)),
                compression=settings.tile_encoding,
            ),
        )

    def split(self, job_id: str) -> dict[str, Any]:
        """Open the upload, plan the tiles, cut the source tiles and write the manifest."""
        return split.split(self, job_id)

    def process_batch(self, job_id: str, tiles: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Run the chain on each tile of one manifest item; a done tile is not done again."""
        return process.process_batch(self, job_id, tiles)

    def statistics_batch(
        self, job_id: str, upto: int, batch: int, tiles: Sequence[Sequence[int]]
    ) -> dict[str, Any]:
        """Store one batch's partial statistics for the pass before step ``upto``."""
        return statistics.statistics_batch(self, job_id, upto, batch, tiles)

    def reduce_statistics(self, job_id: str, manifest_key: str) -> dict[str, Any]:
        """Combine a statistics pass's partials and move the job to its next pass or stage."""
        return statistics.reduce_statistics(self, job_id, manifest_key)

    def compact(self, job_id: str, batches: Sequence[int]) -> dict[str, Any]:
        """Join the small pyramid levels of the batches starting at ``batches``."""
        task = f"joining the small levels of the batches from tile {batches[0]}"
        with second_fanout.says_why(self, job_id, task):
            return compaction.compact(self, job_id, batches)

    def reduce_group(
        self, job_id: str, kind: str, number: int, batches: Sequence[int]
    ) -> dict[str, Any]:
        """Reduce group ``number`` of the first coarse round of the job's ``kind`` of
        pyramid from the pieces of the batches starting at ``batches``."""
        return second_fanout.reduce(self, job_id, kind, number, batches)

    def merge(self, job_id: str) -> dict[str, Any]:
        """Assemble the output, upload it, and mark the job SUCCEEDED."""
        return merge.merge(self, job_id)

    def abort(self, job_id: str, error: Mapping[str, Any] | None) -> dict[str, Any]:
        """Mark the job FAILED with a code and a sentence, and remove its intermediates."""
        return abort.abort(self, job_id, error)

    def cleanup(self, job_id: str) -> dict[str, Any]:
        """Remove what a cancelled job ran with, or everything of a deleted one."""
        return cleanup.cleanup(self, job_id)

    def discard_if_ended(self, job_id: str) -> int:
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
        # The result's upload the workers copied into, if the merger never completed it.
        removed += abort_uploads(self.store, keys.result_prefix(job_id))
        if status is not JobStatus.SUCCEEDED:
            removed += self.store.delete_prefix(keys.result_prefix(job_id))
        return removed

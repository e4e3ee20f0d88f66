"""Tile state at scale: a status read costs the same requests at any tile count, and the
progress grid and counts follow every tile exactly through retries and duplicate deliveries."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import tilefan.stages.pipeline
import tilefan.stages.process
from tests.support import noise_image
from tilefan import TransientError
from tilefan.imaging.geometry import Rect
from tilefan.local.stack import LOCAL_OWNER, LocalStack, run_job
from tilefan.state.jobs import (
    BANDS,
    MAX_TILES,
    STRIPE_TILES,
    JobRepository,
    JobStatus,
    TileOutcome,
    TileState,
)

pytestmark = pytest.mark.integration

TILE = 64
COLUMNS, GRID_ROWS = 5, 4  # a 300 x 200 source in 64-pixel tiles
TILES = COLUMNS * GRID_ROWS


def _split_job(jobs: JobRepository, tile_count: int) -> str:
    """A job as the splitter leaves it: a tile grid on the job item, every tile PENDING."""
    job = jobs.new_job(owner=LOCAL_OWNER, operations=[], output_format="png", tile_size=64)
    jobs.create_tiles(job.job_id, tile_count)
    jobs.transition(
        job.job_id,
        JobStatus.CREATED,
        allowed_from={JobStatus.CREATED},
        grid={"tile_count": tile_count, "columns": 100, "rows": -(-tile_count // 100)},
    )
    return job.job_id


def _count_requests(jobs: JobRepository) -> tuple[Counter[str], Any]:
    """Every DynamoDB request the repository's client makes, by operation, from now on."""
    requests: Counter[str] = Counter()

    def count(model: Any, **kwargs: Any) -> None:
        requests[model.name] += 1

    events = jobs.resource.meta.client.meta.events
    events.register("before-call.dynamodb", count)
    return requests, lambda: events.unregister("before-call.dynamodb", count)


@pytest.mark.parametrize("tile_count", [100, MAX_TILES])
def test_a_status_read_is_the_same_two_requests_at_any_tile_count(
    stack: LocalStack, tile_count: int
) -> None:
    jobs = stack.service.jobs
    job_id = _split_job(jobs, tile_count)
    # Tiles 8-47 DONE (ten bands written), one FAILED, two RUNNING.
    done = range(8, 48)
    jobs.tiles_started(job_id, [*done, 1, 2, 4])
    jobs.tiles_finished(
        job_id,
        [TileOutcome(index, TileState.DONE, 120) for index in done]
        + [TileOutcome(1, TileState.FAILED, 80, "tile 1: injected")],
    )

    requests, stop = _count_requests(jobs)
    try:
        view = stack.service.view(LOCAL_OWNER, job_id)
    finally:
        stop()

    # One GetItem of the job, one BatchGetItem of its bands: never a request per tile.
    assert requests == Counter({"GetItem": 1, "BatchGetItem": 1}), requests
    assert view.progress is not None and len(view.progress.grid) == tile_count
    assert view.progress.counts == {
        TileState.DONE: len(done),
        TileState.FAILED: 1,
        TileState.RUNNING: 2,
        TileState.PENDING: tile_count - len(done) - 3,
    }
    assert view.progress.grid[:9] == "PFRPRPPPD"


def test_workers_writing_one_band_at_once_lose_no_tile(stack: LocalStack) -> None:
    jobs = stack.service.jobs
    total = 16 * STRIPE_TILES * BANDS
    job_id = _split_job(jobs, total)
    # Band 0's tiles, as batches of one stripe each: 16 batches written by 8 threads at once.
    batches = [
        list(range(start, start + STRIPE_TILES)) for start in range(0, total, STRIPE_TILES * BANDS)
    ]
    barrier = threading.Barrier(8)

    def worker(mine: list[list[int]]) -> None:
        barrier.wait()
        for batch in mine:
            started = jobs.tiles_started(job_id, batch)
            jobs.tiles_finished(job_id, [TileOutcome(i, TileState.DONE, 5) for i in started])

    threads = [threading.Thread(target=worker, args=(batches[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    records = {r.index: r for r in jobs.tiles(job_id, total, consistent=True)}
    band_zero = [index for batch in batches for index in batch]
    assert len(band_zero) == total // BANDS
    assert all(records[i].state is TileState.DONE and records[i].attempts == 1 for i in band_zero)
    progress = jobs.progress(job_id, total, consistent=True)
    assert progress.done == len(band_zero)
    assert progress.counts[TileState.PENDING] == total - len(band_zero)


class Ledger:
    """What the workers were told and did, tile by tile, checked against the table after
    every tile-state write: the grid, the counts and the per-tile records must all agree."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.states = [TileState.PENDING] * total
        self.attempts = [0] * total
        self.executed: Counter[int] = Counter()
        self.checks = 0
        self.lock = threading.Lock()

    def started(self, indices: list[int], returned: list[int]) -> None:
        assert not any(self.states[i] is TileState.DONE for i in returned), "a DONE tile restarted"
        assert all(self.states[i] is TileState.DONE for i in set(indices) - set(returned))
        for index in returned:
            self.states[index] = TileState.RUNNING
            self.attempts[index] += 1

    def finished(self, outcomes: list[TileOutcome]) -> None:
        for outcome in outcomes:
            self.states[outcome.index] = outcome.state
            if outcome.state is TileState.PENDING:
                self.attempts[outcome.index] -= 1

    def check(self, jobs: JobRepository, job_id: str) -> None:
        progress = jobs.progress(job_id, self.total, consistent=True)
        records = jobs.tiles(job_id, self.total, consistent=True)
        assert progress.grid == "".join(state.letter for state in self.states)
        assert dict(progress.counts) == {s: n for s, n in Counter(self.states).items() if n}
        assert [r.state for r in records] == self.states
        assert [r.attempts for r in records] == self.attempts
        self.checks += 1


def test_grid_and_counts_follow_every_tile_through_retries_and_duplicates(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "noise.png"
    noise_image(300, 200, 3, seed=17).pngsave(str(source))
    ledger = Ledger(TILES)
    repository = JobRepository
    real_started, real_finished = repository.tiles_started, repository.tiles_finished
    real_execute = tilefan.stages.process.execute_tile
    real_batch = tilefan.stages.pipeline.Pipeline.process_batch
    throttled: list[int] = []

    def tiles_started(self: JobRepository, job_id: str, indices: Any) -> list[int]:
        indices = list(indices)
        with ledger.lock:
            returned = real_started(self, job_id, indices)
            ledger.started(indices, returned)
            ledger.check(self, job_id)
        return returned

    def tiles_finished(self: JobRepository, job_id: str, outcomes: Any) -> None:
        outcomes = list(outcomes)
        with ledger.lock:
            if 9 in {o.index for o in outcomes} and not throttled:
                throttled.append(9)  # the batch's outcomes are lost: it runs again
                raise TransientError("injected: the job table was busy")
            real_finished(self, job_id, outcomes)
            ledger.finished(outcomes)
            ledger.check(self, job_id)

    def execute_tile(chain: Any, spec: Any, block: Any, out: Rect) -> Any:
        index = (out.y // TILE) * COLUMNS + out.x // TILE
        with ledger.lock:
            ledger.executed[index] += 1
            fail = index == 14 and ledger.executed[index] == 1
        if fail:
            raise TransientError("injected: storage hiccup")
        return real_execute(chain, spec, block, out)

    def twice(self: Any, job_id: str, tiles: Any) -> Any:
        first = real_batch(self, job_id, tiles)
        real_batch(self, job_id, tiles)
        return first

    monkeypatch.setattr(repository, "tiles_started", tiles_started)
    monkeypatch.setattr(repository, "tiles_finished", tiles_finished)
    monkeypatch.setattr(tilefan.stages.process, "execute_tile", execute_tile)
    monkeypatch.setattr(tilefan.stages.pipeline.Pipeline, "process_batch", twice)

    view = run_job(
        stack,
        source,
        tmp_path / "out.png",
        [{"op": "invert"}],
        output_format="png",
        tile_size=TILE,
        concurrency=2,
        poll_seconds=0.02,
    )

    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    assert throttled == [9]
    assert ledger.checks >= 2 * (TILES // 4) * 2  # both deliveries of every batch, twice each
    # Every tile DONE once; its attempts are the times its chain ran, retries included.
    assert ledger.states == [TileState.DONE] * TILES
    assert ledger.attempts == [ledger.executed[i] for i in range(TILES)]
    assert ledger.executed[14] == 2 and all(ledger.executed[i] == 2 for i in range(8, 12))
    assert view.progress is not None and view.progress.grid == "D" * TILES
    assert view.progress.counts == {TileState.DONE: TILES}

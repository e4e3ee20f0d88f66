"""Decisions that depend on a recent write read it consistently, as DynamoDB requires.

moto answers every read with the latest write; DynamoDB answers a read without
``ConsistentRead`` from any replica, which may lag. Under the engine's ``stale_reads`` such reads
see the table as it was before the job began, the stalest answer AWS may give: a merge that
checked "every tile DONE" or an Abort that looked for "the failing tile" with such a read would
see no tiles at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import tilefan.stages.process
from tests.support import libvips_error, noise_image
from tilefan.local.stack import LocalStack, run_job
from tilefan.state.jobs import JobStatus

pytestmark = pytest.mark.integration


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "small.png"
    noise_image(200, 130, 3, seed=5).pngsave(str(path))
    return path


def test_stale_reads_are_served_for_reads_that_do_not_ask_for_consistency(
    stack: LocalStack,
) -> None:
    table = stack.engine.client("dynamodb")
    name = stack.engine.table
    key = {"pk": {"S": "JOB#stale-check"}, "sk": {"S": "JOB"}}
    with stack.engine.stale_reads():
        table.put_item(TableName=name, Item={**key, "n": {"N": "1"}})
        assert "Item" not in table.get_item(TableName=name, Key=key)
        assert "Item" in table.get_item(TableName=name, Key=key, ConsistentRead=True)
    assert "Item" in table.get_item(TableName=name, Key=key)
    table.delete_item(TableName=name, Key=key)


def test_a_job_succeeds_when_reads_lag_behind_writes(
    stack: LocalStack, source: Path, tmp_path: Path
) -> None:
    with stack.engine.stale_reads():
        view = run_job(
            stack,
            source,
            tmp_path / "out.png",
            [{"op": "invert"}],
            output_format="png",
            tile_size=64,
            poll_seconds=0.05,
        )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    # Read again once reads are fresh: a status read is eventually consistent, as on AWS.
    view = stack.service.view(None, view.job.job_id)
    assert view.progress is not None and view.progress.done == view.progress.total == 12


def test_abort_names_the_failed_tile_when_reads_lag_behind_writes(
    stack: LocalStack, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tilefan.stages.process.execute_tile

    def broken(chain: Any, spec: Any, block: Any, out: Any) -> Any:
        if out.x == 64 and out.y == 64:
            raise libvips_error("injected: a broken tile")
        return real(chain, spec, block, out)

    monkeypatch.setattr(tilefan.stages.process, "execute_tile", broken)
    with stack.engine.stale_reads():
        view = run_job(
            stack,
            source,
            tmp_path / "out.png",
            [{"op": "invert"}],
            output_format="png",
            tile_size=64,
            poll_seconds=0.05,
        )
    assert view.job.status is JobStatus.FAILED
    assert view.job.error == {"code": "TILE_FAILED", "message": "tile 5: injected: a broken tile"}

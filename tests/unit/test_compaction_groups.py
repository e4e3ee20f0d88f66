"""Which COGs get the second fan-out, in which groups, and that an ended job's group does
nothing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tilefan.imaging.operations import parse_chain
from tilefan.imaging.plan import ImageSpec, plan_tiles
from tilefan.stages.compaction import compact, compaction_groups
from tilefan.stages.tiff_output import output_tile_rule
from tilefan.state.jobs import JobStatus


def _groups(side: int, options: dict[str, Any], per_item: int = 4) -> list[list[int]]:
    rule = output_tile_rule("tiff", options)
    plan = plan_tiles(
        ImageSpec(side, side, 3, "uchar", "srgb"), parse_chain([]), 4096, output_tile_rule=rule
    )
    return compaction_groups(plan, options, plan.manifest(per_item))


def test_a_cog_of_many_batches_is_grouped_in_consecutive_batches() -> None:
    # 2 GP at 4096 px: 121 tiles, 31 batches of 4; a batch's level 4 is expected at about
    # 315 KB, so 17 batches make 5 MiB.
    groups = _groups(44_721, {"pyramid": True})
    assert [len(group) for group in groups] == [17, 14]
    assert groups[0][:3] == [0, 4, 8] and groups[1][0] == 17 * 4


@pytest.mark.parametrize(
    ("side", "options"),
    [
        (44_721, {}),  # no pyramid: one level, copied
        (10_000, {"pyramid": True}),  # 100 MP: 3 batches, within one group
    ],
)
def test_no_groups_where_the_merger_gathers_little(side: int, options: dict[str, Any]) -> None:
    assert _groups(side, options) == []


def test_a_group_of_an_ended_job_touches_nothing() -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the store was used: {name}")

    job = SimpleNamespace(status=JobStatus.CANCELLED)
    pipeline = SimpleNamespace(jobs=SimpleNamespace(get=lambda _: job), store=Untouchable())
    assert compact(pipeline, "job", [0, 4]) == {"levels": 0}  # type: ignore[arg-type]

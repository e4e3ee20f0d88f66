"""What the merger no longer does alone. The levels below the workers' blocks, reduced group
by group: with groups made small, a level takes several groups and the pyramid several
rounds, and every page and tile still equals whole-image libvips while the merger never holds
more than one group's pixels. The first of those levels, when larger than one fan-out group,
reduced by the second fan-out's tasks, the merger starting from their pieces. A COG's small
levels, joined across batches by the second fan-out before the merge."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pyvips

import tilefan.stages.compaction
import tilefan.stages.reduction
import tilefan.stages.second_fanout
import tilefan.stages.tiff_output
import tilefan.stages.tileset_output
from tests.integration.test_preview import PREVIEW, preview_files, run_with_preview
from tests.integration.test_tiff_output import assert_cog, libvips_tiff, pages, run_tiff
from tests.integration.test_tileset_output import (
    BLUR,
    assert_same_tiles,
    dzsave_files,
    got_files,
    run_set,
)
from tests.support import assert_identical, compaction_groups_of_two, noise_image, whole
from tilefan.errors import TilefanError, TransientError
from tilefan.local.stack import LocalStack, run_job
from tilefan.state.jobs import JobStatus
from tilefan.state.multipart import MIN_PART, Range
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration


def assert_cog_equals_libvips(
    stack: LocalStack, image: pyvips.Image, tmp_path: Path, ops: Any, levels: int
) -> None:
    """A COG job of ``image`` in 256 px tiles: each of its ``levels`` pages equals libvips',
    and it passes the COG validator."""
    output = run_tiff(stack, image, tmp_path, ops, 256, pyramid=True)
    expected = libvips_tiff(whole(image, ops), tmp_path, compression="deflate", pyramid=True)
    got, want = pages(output), pages(expected)
    assert len(got) == len(want) == levels
    for page_got, page_want in zip(got, want, strict=True):
        assert_identical(page_want, page_got)
    assert_cog(output)


TILE_SETS = pytest.mark.parametrize(
    ("output_format", "options"),
    [
        ("dzi", {"tile_size": 128, "overlap": 3, "suffix": "png"}),
        ("dz", {"tile_size": 254, "overlap": 1}),
        ("iiif", {"tile_size": 128, "suffix": "png"}),
    ],
)
"""A DeepZoom set with overlap, a zip, and IIIF, each with its own tile size."""


@pytest.fixture
def mosaics(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Groups of at most 256 x 256 RGB pixels, all of them the merger's (no fan-out); the
    size of every group the merger reads."""
    monkeypatch.setattr(tilefan.stages.reduction, "GROUP_BYTES", 3 * 256 * 256)
    monkeypatch.setattr(tilefan.stages.reduction, "FANOUT_SIDE", 2**30)
    made: list[tuple[int, int]] = []
    real = tilefan.stages.reduction.from_array

    def watched(pixels: Any, pixel_format: str, interpretation: str) -> pyvips.Image:
        made.append((pixels.shape[1], pixels.shape[0]))
        return real(pixels, pixel_format, interpretation)

    monkeypatch.setattr(tilefan.stages.reduction, "from_array", watched)
    return made


def test_a_cog_reduced_in_many_groups_and_rounds_equals_libvips(
    stack: LocalStack, tmp_path: Path, mosaics: list[tuple[int, int]]
) -> None:
    """256 px blocks leave level 1 (1500 x 1100) to the merger: 6 x 5 groups of 256 px, whose
    pieces make level 2 (750 x 550, 3 x 3 groups), then level 3 (375 x 275, 2 x 2), then the
    last level in one group."""
    assert_cog_equals_libvips(stack, noise_image(3000, 2200, 3, seed=5), tmp_path, BLUR, 5)
    assert len(mosaics) == 30 + 9 + 4 + 1
    assert (1500 - 5 * 256, 1100 - 4 * 256) in mosaics  # the first level's corner group
    assert max(width * height for width, height in mosaics) == 256 * 256


@TILE_SETS
def test_a_tile_set_reduced_in_many_groups_and_rounds_equals_dzsave(
    stack: LocalStack,
    tmp_path: Path,
    mosaics: list[tuple[int, int]],
    output_format: str,
    options: dict[str, Any],
) -> None:
    """Groups at a level reach into their neighbours' pieces for the tiles' overlap."""
    image = noise_image(2300, 1700, 3, seed=9)  # level 2: 575 x 425
    output = run_set(stack, image, tmp_path, output_format, 256, options=options)
    expected = dzsave_files(whole(image, BLUR), tmp_path, output_format, **options)
    assert_same_tiles(expected, got_files(output, output_format))
    assert len(mosaics) > 6  # at least the first level's 3 x 2 groups, and a group a round
    # A group grows by its tiles' overlap at its coarsest level, at most two levels down.
    bound = 256 + 2 * options.get("overlap", 0) * 2
    assert all(width <= bound and height <= bound for width, height in mosaics)


def test_a_preview_reduced_in_many_groups_equals_dzsave(
    stack: LocalStack, tmp_path: Path, mosaics: list[tuple[int, int]]
) -> None:
    image = noise_image(2600, 1900, 3, seed=13)
    output = run_with_preview(stack, image, tmp_path, "tiff", 256)
    expected = dzsave_files(whole(image, BLUR), tmp_path, "dzi", **PREVIEW)
    assert_same_tiles(expected, preview_files(stack, output["job_id"]))
    assert len(mosaics) > 6
    assert max(width * height for width, height in mosaics) == 256 * 256


@dataclass
class Fanout:
    """What the second fan-out reduced, and the levels the merger reduced itself."""

    groups: list[tuple[str, int, list[int]]] = field(default_factory=list)
    """Each task's kind, group number and batches."""
    levels: set[int] = field(default_factory=set)
    """The levels the tasks reduced."""
    merger_levels: list[int] = field(default_factory=list)
    """The level of the pieces each `reduce_levels` of the merger started from."""


@pytest.fixture
def fanout(monkeypatch: pytest.MonkeyPatch) -> Fanout:
    """Fan-out groups of 256 px; the tasks and the merger's reductions, recorded."""
    monkeypatch.setattr(tilefan.stages.reduction, "FANOUT_SIDE", 256)
    seen = Fanout()
    real_reduce = tilefan.stages.second_fanout.reduce

    def reduce(pipeline: Any, job_id: str, kind: str, number: int, batches: Any) -> Any:
        seen.groups.append((kind, number, list(batches)))
        answer = real_reduce(pipeline, job_id, kind, number, batches)
        seen.levels.add(answer["level"])
        return answer

    monkeypatch.setattr(tilefan.stages.second_fanout, "reduce", reduce)
    real_levels = tilefan.stages.reduction.reduce_levels

    def reduce_levels(store: Any, pieces: Any, *args: Any) -> Any:
        if pieces:  # none for a TIFF without a pyramid
            seen.merger_levels.append(min(piece.level for piece in pieces))
        return real_levels(store, pieces, *args)

    monkeypatch.setattr(tilefan.stages.reduction, "reduce_levels", reduce_levels)
    return seen


STATISTICS_FIRST = [{"op": "hist_equal"}, *BLUR]


@pytest.mark.parametrize("ops", [BLUR, STATISTICS_FIRST], ids=["blur", "after-a-statistics-pass"])
def test_a_cog_whose_first_coarse_level_is_fanned_out_equals_libvips(
    stack: LocalStack, tmp_path: Path, fanout: Fanout, ops: list[dict[str, Any]]
) -> None:
    """256 px blocks leave level 1 (1500 x 1100): 6 x 5 fan-out groups of 256 px, each read
    from the batches under it; the merger starts from their pieces, at level 2."""
    assert_cog_equals_libvips(stack, noise_image(3000, 2200, 3, seed=5), tmp_path, ops, 5)
    assert sorted(number for _, number, _ in fanout.groups) == list(range(30))
    assert {kind for kind, _, _ in fanout.groups} == {"tiff"}
    batches = {first for _, _, firsts in fanout.groups for first in firsts}
    assert all(len(firsts) < len(batches) for _, _, firsts in fanout.groups)
    assert fanout.levels == {1}
    assert fanout.merger_levels == [2]


def test_a_fanned_out_group_that_fails_is_retried_or_fails_the_job_with_its_sentence(
    stack: LocalStack, tmp_path: Path, fanout: Fanout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group 3's reduction fails: once with a transient error (the state machine runs it
    again and the result still equals libvips), then for good (the job ends FAILED, saying
    which group and why, and leaves nothing behind)."""
    image = noise_image(1500, 1100, 3, seed=7)  # level 1: 750 x 550, 3 x 3 groups of 256 px
    real = tilefan.stages.second_fanout.reduce_group
    failures: list[BaseException] = [TransientError("injected: storage hiccup")]

    def reduce_group(store: Any, pieces: Any, reduction: Any, blocks: Any, number: int, *a: Any):
        if number == 3 and failures:
            raise failures.pop(0)
        return real(store, pieces, reduction, blocks, number, *a)

    monkeypatch.setattr(tilefan.stages.second_fanout, "reduce_group", reduce_group)
    assert_cog_equals_libvips(stack, image, tmp_path, BLUR, 4)
    assert [number for _, number, _ in fanout.groups].count(3) == 2

    failures.append(TilefanError("injected: the pieces do not cover the group"))
    message = "level 1, group 3: injected: the pieces do not cover the group"
    assert_cog_fails(stack, image, tmp_path, 256, message)


def assert_cog_fails(
    stack: LocalStack, image: pyvips.Image, tmp_path: Path, tile_size: int, message: str
) -> None:
    """A COG job of ``image`` ends FAILED with ``message``, leaving nothing behind."""
    source = tmp_path / "fails.png"
    image.pngsave(str(source))
    view = run_job(
        stack,
        source,
        tmp_path / "fails.tif",
        BLUR,
        output_format="tiff",
        tile_size=tile_size,
        output_options={"pyramid": True},
        poll_seconds=0.05,
    )
    assert view.job.status is JobStatus.FAILED
    assert view.job.error == {"code": "INTERNAL_ERROR", "message": message}
    store = stack.service.store
    assert store.list_keys(keys.job_prefix(view.job.job_id)) == []
    assert store.list_keys(keys.result_prefix(view.job.job_id)) == []


@TILE_SETS
def test_a_tile_set_whose_first_coarse_level_is_fanned_out_equals_dzsave(
    stack: LocalStack,
    tmp_path: Path,
    fanout: Fanout,
    output_format: str,
    options: dict[str, Any],
) -> None:
    """Fan-out groups reach into their neighbours' pieces for the tiles' overlap, as the
    merger's do."""
    image = noise_image(2300, 1700, 3, seed=9)
    output = run_set(stack, image, tmp_path, output_format, 256, options=options)
    expected = dzsave_files(whole(image, BLUR), tmp_path, output_format, **options)
    assert_same_tiles(expected, got_files(output, output_format))
    assert len(fanout.groups) > 1
    assert {kind for kind, _, _ in fanout.groups} == {"set"}
    [fanned_out] = fanout.levels
    [merger_level] = fanout.merger_levels
    assert merger_level > fanned_out


def test_a_preview_whose_first_coarse_level_is_fanned_out_equals_dzsave(
    stack: LocalStack, tmp_path: Path, fanout: Fanout
) -> None:
    image = noise_image(2600, 1900, 3, seed=13)
    output = run_with_preview(stack, image, tmp_path, "tiff", 256)
    expected = dzsave_files(whole(image, BLUR), tmp_path, "dzi", **PREVIEW)
    assert_same_tiles(expected, preview_files(stack, output["job_id"]))
    assert {kind for kind, _, _ in fanout.groups} == {"preview"}
    assert len(fanout.groups) > 1
    [fanned_out] = fanout.levels
    [merger_level] = fanout.merger_levels
    assert merger_level > fanned_out


@pytest.mark.parametrize("ops", [BLUR, STATISTICS_FIRST], ids=["blur", "after-a-statistics-pass"])
def test_a_cog_of_many_batches_joins_their_small_levels_before_the_merge(
    stack: LocalStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ops: list[dict[str, Any]],
) -> None:
    """Groups of two batches: the second fan-out joins each group's small levels, and the
    merger copies every batch range it uses (it passes none of them through itself)."""
    groups = compaction_groups_of_two(monkeypatch)
    ranges: list[Range] = []
    real_assemble = tilefan.stages.tiff_output.assemble_object

    def assemble(store: Any, key: str, pieces: Any, content_type: str, **options: Any) -> int:
        def watched() -> Any:
            for piece in pieces:
                if isinstance(piece, Range):
                    ranges.append(piece)
                yield piece

        return real_assemble(store, key, watched(), content_type, **options)

    monkeypatch.setattr(tilefan.stages.tiff_output, "assemble_object", assemble)
    image = noise_image(4096, 4096, 3, seed=17)  # 16 blocks of 1024 px: 4 batches of 4
    output = run_tiff(stack, image, tmp_path, ops, 1024, pyramid=True)
    got, want = pages(output), pages(libvips_tiff(whole(image, ops), tmp_path, pyramid=True))
    assert len(got) == len(want) == 5
    for page_got, page_want in zip(got, want, strict=True):
        assert_identical(page_want, page_got)
    assert_cog(output)
    assert sorted(groups) == [[0, 4], [8, 12]]
    from_groups = [piece for piece in ranges if piece.key.endswith(".compact-tiles")]
    batch_objects = {f"/encoded/{first:06d}.tiles" for first in (0, 4, 8, 12)}
    from_batches = [piece for piece in ranges if piece.key[-20:] in batch_objects]
    assert from_groups and all(piece.length >= MIN_PART for piece in from_batches), ranges


def test_a_joining_group_that_fails_fails_the_job_with_its_sentence(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second group of two batches cannot write its joined object: the job ends FAILED
    saying which group and why, not with the Map's failure threshold."""
    compaction_groups_of_two(monkeypatch)
    real_assemble = tilefan.stages.compaction.assemble_object

    def assemble(store: Any, key: str, pieces: Any, content_type: str) -> int:
        if key.endswith("/000008.compact-tiles"):
            raise TilefanError("storage refused the joined object (injected)")
        return real_assemble(store, key, pieces, content_type)

    monkeypatch.setattr(tilefan.stages.compaction, "assemble_object", assemble)
    image = noise_image(4096, 4096, 3, seed=17)  # 4 batches of 4 blocks
    message = (
        "joining the small levels of the batches from tile 8: "
        "storage refused the joined object (injected)"
    )
    assert_cog_fails(stack, image, tmp_path, 1024, message)

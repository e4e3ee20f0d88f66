"""A worker computes its block's chain once, however many times its output writer reads it,
and holds its encoded levels once when it writes them.

A tile's result is a lazy libvips pipeline: every read (an encode, a halving, each cut tile)
would run the chain again. Counted with libvips' own ``preeval`` signal, which fires each
time a pipeline is computed.
"""

from __future__ import annotations

import json
import tracemalloc
from types import SimpleNamespace
from typing import Any

import pytest
import pyvips

from tilefan.imaging.operations import parse_chain
from tilefan.imaging.plan import ImageSpec, Rect, Tile
from tilefan.stages import tiff_output
from tilefan.stages.stream_merge import StreamedBatchWriter
from tilefan.stages.tiff_output import TiffBatchWriter
from tilefan.stages.tileset_output import TileSetBatchWriter
from tilefan.state.jobs import Job, JobStatus

SIZE = 1024


class _Store:
    """Takes what the writers write."""

    def __init__(self) -> None:
        self.objects: dict[str, int] = {}

    def put_bytes(self, key: str, body: bytes, *args: Any) -> None:
        self.objects[key] = len(body)

    def put_json(self, key: str, document: Any) -> None:
        self.objects[key] = len(json.dumps(document))

    def put_tile(self, job_id: str, stage: str, index: int, tile: pyvips.Image, **_: Any) -> None:
        self.objects[f"{stage}/{index}"] = len(tile.write_to_memory())


def _job(output_format: str, **options: Any) -> Job:
    grid = {"output_width": SIZE, "output_height": SIZE, "output_tile": SIZE, "columns": 1}
    return Job(
        job_id="job",
        owner="owner",
        status=JobStatus.PROCESSING,
        operations=[],
        output_format=output_format,
        tile_size=SIZE,
        created_at="",
        output_options=options,
        grid=grid,
    )


def _counted_block() -> tuple[pyvips.Image, list[int]]:
    """A lazy 8-bit RGB block behind a blur, and how many times it has been computed."""
    source = pyvips.Image.gaussnoise(SIZE + 16, SIZE + 16, mean=128, sigma=30)
    block = source.gaussblur(2).crop(8, 8, SIZE, SIZE).cast("uchar").bandjoin_const([0, 0])
    block = block.copy(interpretation="srgb")
    computed = [0]
    block.set_progress(True)
    block.signal_connect("preeval", lambda *_: computed.__setitem__(0, computed[0] + 1))
    return block, computed


def _tile() -> Tile:
    return Tile(0, Rect(0, 0, SIZE, SIZE), Rect(0, 0, SIZE, SIZE))


def _preview(pipeline: Any, job: Job) -> TileSetBatchWriter:
    spec = ImageSpec(SIZE, SIZE, 3, "uchar", "srgb")
    return TileSetBatchWriter(pipeline, job, 0, parse_chain([]), spec, preview=True)


@pytest.mark.parametrize(
    ("options", "preview"),
    [({}, False), ({"pyramid": True}, False), ({}, True), ({"pyramid": True}, True)],
    ids=["tiff", "pyramid", "tiff-preview", "pyramid-preview"],
)
def test_a_tiff_batch_computes_the_block_once(options: dict[str, Any], preview: bool) -> None:
    pipeline = SimpleNamespace(store=_Store())
    job = _job("tiff", **options)
    writer = TiffBatchWriter(
        pipeline,  # type: ignore[arg-type]
        job,
        first_tile=0,
        preview=_preview(pipeline, job) if preview else None,
    )
    block, computed = _counted_block()
    writer.add(_tile(), block)
    assert computed[0] == 1


def test_a_result_of_one_level_is_never_halved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a pyramid, a halving would be thrown away: none is made."""
    pipeline = SimpleNamespace(store=_Store())

    def refuse(_: pyvips.Image) -> pyvips.Image:
        raise AssertionError("halved a block of a one-level result")

    monkeypatch.setattr(tiff_output, "halve", refuse)
    writer = TiffBatchWriter(pipeline, _job("tiff"), first_tile=0)  # type: ignore[arg-type]
    writer.add(_tile(), _counted_block()[0])
    assert sum(len(block) for block in writer.levels[0].tiles) == (SIZE // 256) ** 2


def test_a_tiff_batch_holds_its_encoded_levels_once_when_it_writes_them() -> None:
    """The batch's object is joined from its levels' own buffers, not from a copy of each
    (a batch of 4096 px blocks holds hundreds of MB of levels: the copies were the worker's
    peak)."""
    pipeline = SimpleNamespace(store=_Store())
    job = _job("tiff", pyramid=True, compression="none")
    writer = TiffBatchWriter(pipeline, job, first_tile=0)  # type: ignore[arg-type]
    writer.add(_tile(), _counted_block()[0])
    held = sum(len(level.data) for level in writer.levels)
    tracemalloc.start()
    try:
        writer.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pipeline.store.objects["jobs/job/encoded/000000.tiles"] == held > SIZE * SIZE * 3
    assert peak < 1.5 * held


@pytest.mark.parametrize("output_format", ["dzi", "iiif", "dz"])
def test_a_tile_set_batch_computes_the_block_once(output_format: str) -> None:
    """A block cut into many set tiles (and halved) is computed once, not once per tile."""
    pipeline = SimpleNamespace(store=_Store())
    spec = ImageSpec(SIZE, SIZE, 3, "uchar", "srgb")
    writer = TileSetBatchWriter(
        pipeline,  # type: ignore[arg-type]
        _job(output_format),
        0,
        parse_chain([]),
        spec,
    )
    block, computed = _counted_block()
    writer.add(writer.expand(_tile()), block)
    assert writer.tiles > 4
    assert computed[0] == 1


def test_a_streamed_batch_with_a_preview_computes_the_block_once() -> None:
    pipeline = SimpleNamespace(store=_Store())
    job = _job("png")
    writer = StreamedBatchWriter(pipeline, "job", _preview(pipeline, job))  # type: ignore[arg-type]
    block, computed = _counted_block()
    writer.add(_tile(), block)
    assert "out/0" in pipeline.store.objects
    assert computed[0] == 1

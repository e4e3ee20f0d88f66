"""The TIFF byte writer and the block encoder, against libvips and tifffile."""

from __future__ import annotations

import io
import json
import tracemalloc
from typing import Any

import numpy as np
import pytest
import pyvips
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import assert_identical, noise_image
from tilefan import ImageSpec, parse_chain, plan_tiles
from tilefan.formats.tiff_layout import (
    TILE_OFFSETS,
    Page,
    Tag,
    layout,
    read_tags,
    tile_locations,
)
from tilefan.formats.tiff_tiles import (
    TIFF_TILE,
    TiffEncoding,
    encode_block,
    halve,
    level_sizes,
    tiff_output_tile,
    without_metadata,
)
from tilefan.imaging.plan import SAMPLE_BYTES, TilePlan
from tilefan.stages.tiff_output import (
    level_length,
    output_tile_rule,
    pack_tiles,
    reserved_part,
    tiles_per_item,
    unpack_tiles,
)
from tilefan.state.multipart import MAX_PARTS, MIN_PART

pytestmark = pytest.mark.unit


def blocks(image: pyvips.Image, size: int) -> list[tuple[int, int, pyvips.Image]]:
    return [
        (x, y, image.crop(x, y, min(size, image.width - x), min(size, image.height - y)))
        for y in range(0, image.height, size)
        for x in range(0, image.width, size)
    ]


def assemble(
    image: pyvips.Image, encoding: TiffEncoding, block: int, bigtiff_above: int
) -> tuple[bytes, list[Page]]:
    """Encode ``image`` block by block, then write the file as the merger does (in memory)."""
    across = -(-image.width // TIFF_TILE)
    tiles: dict[int, bytes] = {}
    order: list[int] = []
    tags = None
    for x, y, part in blocks(image, block):
        encoded = encode_block(part, encoding, metadata=(x, y) == (0, 0))
        tags = tags or encoded.tags
        part_across = -(-part.width // TIFF_TILE)
        for position, data in enumerate(encoded.tiles):
            row, column = divmod(position, part_across)
            index = (y // TIFF_TILE + row) * across + x // TIFF_TILE + column
            tiles[index] = data
            order.append(index)
    assert tags is not None
    counts = [len(tiles[index]) for index in range(len(tiles))]
    page = Page(image.width, image.height, TIFF_TILE, tags, counts, stored_order=order)
    head, size = layout([page], bigtiff_above=bigtiff_above)
    body = head.head + b"".join(tiles[index] for index in order)
    assert len(body) == size
    return body, [page]


@pytest.mark.parametrize("compression", ["deflate", "lzw", "none", "jpeg"])
@pytest.mark.parametrize("bigtiff_above", [2**32 - 1, 0], ids=["classic", "bigtiff"])
@pytest.mark.parametrize("block", [256, 512, 1024])
def test_blocks_written_around_by_the_layout_read_back_as_the_whole_image_save(
    compression: str, bigtiff_above: int, block: int
) -> None:
    image = noise_image(1100, 700, 3, seed=block)
    encoding = TiffEncoding(compression=compression, quality=85)
    body, _pages = assemble(image, encoding, block, bigtiff_above)
    whole = image.tiffsave_buffer(
        tile=True, tile_width=256, tile_height=256, compression=compression, Q=85
    )
    expected = pyvips.Image.new_from_buffer(whole, "")
    assert_identical(expected, pyvips.Image.new_from_buffer(body, ""))
    with tifffile.TiffFile(io.BytesIO(body)) as tiff:
        assert tiff.is_bigtiff == (bigtiff_above == 0)
        if compression in ("none", "deflate"):  # tifffile decodes these without imagecodecs
            assert np.array_equal(tiff.asarray(), expected.numpy())


def test_jpeg_blocks_are_the_bytes_libvips_writes_for_the_whole_image() -> None:
    image = noise_image(700, 600, 3, seed=1)
    whole = image.tiffsave_buffer(
        tile=True, tile_width=256, tile_height=256, compression="jpeg", Q=75
    )
    expected = [whole[offset : offset + n] for offset, n in tile_locations(read_tags(whole))]
    body, _pages = assemble(image, TiffEncoding(compression="jpeg"), 512, 2**32 - 1)
    tags = read_tags(body)
    got = [body[offset : offset + n] for offset, n in tile_locations(tags)]
    assert got == expected


def test_out_of_line_tags_such_as_an_icc_profile_travel_unchanged() -> None:
    image = noise_image(300, 300, 3).copy()
    profile = pyvips.Image.profile_load("srgb")
    image.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    image = image.copy(xres=4.5, yres=2.25)
    body, _pages = assemble(image, TiffEncoding(), 256, 2**32 - 1)
    back = pyvips.Image.new_from_buffer(body, "")
    assert back.get("icc-profile-data") == profile
    assert (back.xres, back.yres) == pytest.approx((4.5, 2.25))
    assert 34675 not in {tag.code for tag in without_metadata(read_tags(body))}


def test_pages_are_laid_out_ifds_first_then_data_smallest_page_first() -> None:
    image = noise_image(600, 520, 1, seed=2)
    encoded = [encode_block(image, TiffEncoding(), metadata=True)]
    encoded.append(encode_block(halve(image), TiffEncoding(), metadata=False))
    pages = [
        Page(
            image.width,
            image.height,
            TIFF_TILE,
            encoded[0].tags,
            [len(t) for t in encoded[0].tiles],
        ),
        Page(
            300, 260, TIFF_TILE, encoded[0].tags, [len(t) for t in encoded[1].tiles], reduced=True
        ),
    ]
    head, size = layout(pages)
    body = head.head + b"".join(encoded[1].tiles) + b"".join(encoded[0].tiles)
    assert len(body) == size
    with tifffile.TiffFile(io.BytesIO(body)) as tiff:
        assert [page.shape[:2] for page in tiff.pages] == [(520, 600), (260, 300)]
        first_data = [min(page.dataoffsets) for page in tiff.pages]
        assert first_data[1] == len(head.head) < first_data[0]
        assert np.array_equal(tiff.pages[1].asarray(), halve(image).numpy())


def test_a_result_past_4_gb_is_laid_out_as_bigtiff_with_its_real_offsets() -> None:
    """The head of a result whose tiles pass 4 GB: its offsets do not fit a classic TIFF's
    32 bits, so the layout is BigTIFF at once (a 2 GP job's merge failed measuring a classic
    head first). Laid out from byte counts alone: no data is made."""
    tags = encode_block(noise_image(512, 512, 3, seed=4), TiffEncoding(), metadata=True).tags
    gigabyte = 2**30
    page = Page(512, 512, TIFF_TILE, tags, [gigabyte, gigabyte, 2 * gigabyte, gigabyte])
    head, size = layout([page])
    assert head.bigtiff
    assert size == len(head.head) + 5 * gigabyte
    by_code = {tag.code: tag for tag in read_tags(head.head)}
    assert by_code[TILE_OFFSETS].as_integers() == tuple(
        len(head.head) + start for start in (0, gigabyte, 2 * gigabyte, 4 * gigabyte)
    )


def test_a_tag_value_that_does_not_fit_its_type_is_refused_not_wrapped() -> None:
    """Tile tables are numpy arrays: a cast alone would wrap an offset past 4 GB silently."""
    assert Tag.integers(TILE_OFFSETS, [2**32 - 1]).as_integers() == (2**32 - 1,)
    assert Tag.integers(TILE_OFFSETS, np.array([2**32], np.uint64), 16).as_integers() == (2**32,)
    with pytest.raises(ValueError, match="does not fit"):
        Tag.integers(TILE_OFFSETS, np.array([5, 2**32], np.uint64))
    with pytest.raises(ValueError, match="does not fit"):
        Tag.integers(TILE_OFFSETS, [-1])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, 2**32 - 1)] * 3), max_size=300))
def test_a_tile_table_reads_back_from_its_index_as_it_was_written(
    rows: list[tuple[int, int, int]],
) -> None:
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    index = json.loads(json.dumps({"tile_table": pack_tiles(table)}))
    back = unpack_tiles(index["tile_table"])
    assert back.shape == table.shape
    assert np.array_equal(back, table)
    assert level_length({"tile_table": index["tile_table"]}) == sum(row[2] for row in rows)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 1400), st.integers(1, 1400))
def test_level_sizes_are_the_pages_libvips_writes(width: int, height: int) -> None:
    image = pyvips.Image.black(width, height).cast("uchar")
    body = image.tiffsave_buffer(tile=True, tile_width=256, tile_height=256, pyramid=True)
    with tifffile.TiffFile(io.BytesIO(body)) as tiff:
        pages = [(page.imagewidth, page.imagelength) for page in tiff.pages]
    assert level_sizes(width, height, pyramid=True) == pages


@pytest.mark.parametrize(
    ("bands", "fmt"),
    [
        (3, "uchar"),
        (1, "uchar"),
        (2, "uchar"),
        (4, "uchar"),
        (4, "ushort"),
        (3, "ushort"),
        (1, "short"),
        (3, "char"),
        (3, "float"),
    ],
)
def test_halving_blocks_makes_libvips_pyramid_pages(bands: int, fmt: str) -> None:
    image = noise_image(1537, 1029, bands, fmt=fmt, seed=bands)
    body = image.tiffsave_buffer(
        tile=True, tile_width=256, tile_height=256, pyramid=True, compression="none"
    )
    level = image
    for page in range(1, len(level_sizes(image.width, image.height, pyramid=True))):
        # Blocks of 512 halve on their own, as a worker's do; join them as the merger would.
        parts = [
            (x // 2, y // 2, halve(part))
            for x, y, part in blocks(level, 512)
            if min(part.width, part.height) >= 2
        ]
        joined = (
            pyvips.Image.black(level.width // 2, level.height // 2, bands=bands)
            .cast(fmt)
            .copy(interpretation=level.interpretation)
        )
        for x, y, part in parts:
            joined = joined.insert(part, x, y)
        expected = pyvips.Image.new_from_buffer(body, "", page=page)
        assert_identical(expected, joined)
        level = joined


@pytest.mark.parametrize(("planned", "tile"), [(16, 256), (300, 256), (400, 512), (1024, 1024)])
def test_output_tiles_of_a_tiff_result_are_power_of_two_tiff_tiles(planned: int, tile: int) -> None:
    assert tiff_output_tile(planned) == tile


def _tiff_plan(side: int, tile_size: int) -> TilePlan:
    return plan_tiles(
        ImageSpec(side, side, 3, "uchar"),
        parse_chain([]),
        tile_size,
        output_tile_rule=output_tile_rule("tiff", {}),
    )


@pytest.mark.parametrize(
    ("tile_size", "compression"), [(1024, "deflate"), (1024, "none"), (256, "jpeg"), (64, "lzw")]
)
def test_tiff_batches_aim_past_two_copy_parts_within_a_pixel_bound(
    tile_size: int, compression: str
) -> None:
    plan = _tiff_plan(40000, tile_size)
    count = tiles_per_item(plan, {"compression": compression}, 4)
    pixels = count * plan.output_tile**2
    ratio = {"deflate": 0.4, "none": 1.0, "jpeg": 0.1, "lzw": 0.5}[compression]
    assert pixels <= 2**27 and plan.tile_count // count >= 64
    spread = plan.tile_count // 64
    assert pixels * 3 * ratio >= 2 * MIN_PART or pixels == 2**27 or count in (4, spread)


@pytest.mark.parametrize("tile_size", [1024, 2048, 4096])
def test_a_cogs_batches_aim_for_its_level_2_to_pass_two_copy_parts(tile_size: int) -> None:
    """A pyramid's level 2 is 1/16 of a batch's level 0: batches grow until it too is copied
    (within the pixel bound), where a one-level result keeps small ones."""
    plan = _tiff_plan(100_000, tile_size)
    flat = tiles_per_item(plan, {"compression": "deflate"}, 4)
    count = tiles_per_item(plan, {"compression": "deflate", "pyramid": True}, 4)
    level_2 = count * plan.output_tile**2 * 3 * 0.4 / 16
    assert count > flat
    assert level_2 >= 2 * MIN_PART or count * plan.output_tile**2 == 2**27


@pytest.mark.parametrize(
    ("chain", "pixel_bytes", "tiles"),
    [
        ([], 3, {"flat": 4, "cog": 8}),  # 8-bit RGB: the default, or eight 4096 px tiles
        ([{"op": "linear", "a": 1.5, "b": 0}], 12, {"flat": 2, "cog": 2}),  # float RGB
        ([{"op": "colourspace", "space": "rgb16"}], 6, {"flat": 4, "cog": 4}),  # 16-bit RGB
    ],
)
def test_a_batch_holds_a_bounded_number_of_the_results_bytes(
    chain: list[dict[str, Any]], pixel_bytes: int, tiles: dict[str, int]
) -> None:
    """A worker holds its batch's encoded tiles until it writes them: up to their raw size. The
    bound is on the result's bytes (the chain's output, not the source's), the default of 4
    included: two 4096 px tiles of float RGB at most, where the source's bytes allowed four."""
    plan = plan_tiles(
        ImageSpec(100_000, 100_000, 3, "uchar"),
        parse_chain(chain),
        4096,
        output_tile_rule=output_tile_rule("tiff", {}),
    )
    assert plan.output.bands * SAMPLE_BYTES[plan.output.format] == pixel_bytes
    flat = tiles_per_item(plan, {"compression": "none"}, 4)
    cog = tiles_per_item(plan, {"compression": "deflate", "pyramid": True}, 4)
    assert {"flat": flat, "cog": cog} == tiles
    assert max(flat, cog) * plan.output_tile**2 * pixel_bytes <= 3 * 2**27


def test_a_small_job_keeps_its_batches_spread_over_the_workers() -> None:
    """Batches grow past the default only while the job keeps 64 items."""
    plan = _tiff_plan(12000, 1024)  # 144 tiles
    assert tiles_per_item(plan, {"compression": "deflate", "pyramid": True}, 4) == 4
    assert tiles_per_item(plan, {"compression": "deflate", "pyramid": True}, 1) == 2


@pytest.mark.parametrize(
    ("output_format", "options", "planned", "output_tile"),
    [
        ("tiff", {"preview": False}, 100, 256),  # a TIFF's own tiles need it anyway
        ("png", {}, 100, 256),  # the preview is on by default
        ("png", {}, 1500, 2048),
        ("jpeg", {"preview": True}, 1024, 1024),
        ("webp", {"preview": False}, 100, 100),  # no preview: the tile asked for
        ("png", {"preview": False}, 1500, 1500),
    ],
)
def test_a_streamed_result_with_a_preview_takes_whole_preview_tiles(
    output_format: str, options: dict[str, Any], planned: int, output_tile: int
) -> None:
    rule = output_tile_rule(output_format, options)
    assert (rule(planned) if rule is not None else planned) == output_tile


@pytest.mark.parametrize(("bands", "fmt"), [(3, "uchar"), (1, "ushort"), (4, "uchar")])
def test_halving_a_block_makes_no_64_bit_copies_of_it(bands: int, fmt: str) -> None:
    """Every worker halves its block and the merger each coarse group. Beside the block's
    pixels read out, the halving holds its sums and result (3/4 of the block; with alpha,
    libvips' double sums: 3.5x), not four 64-bit copies of the block (10x), which made the
    merger's peak grow with the image."""
    image = noise_image(1024, 768, bands, fmt=fmt).copy_memory()
    size = image.width * image.height * bands * (1 if fmt == "uchar" else 2)
    tracemalloc.start()
    try:
        halved = halve(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (halved.width, halved.height) == (512, 384)
    assert peak < (4 if bands == 4 else 1) * size


@given(levels=st.integers(1, 6), batches=st.integers(1, 2000))
def test_reserved_parts_follow_the_files_order_with_room_before_each_level(
    levels: int, batches: int
) -> None:
    """The workers' part numbers: a block per level, coarsest first as the file holds them,
    batches in order within it, each block after a gap for the merger's own parts."""
    gap = (MAX_PARTS - levels * batches) // levels
    if gap < 64:
        return  # the splitter opens no upload: the merger copies every range
    assembly = {"levels": levels, "batches": batches, "gap": gap}
    numbers = [
        reserved_part(assembly, batch, level)
        for level in reversed(range(levels))
        for batch in range(batches)
    ]
    assert numbers == sorted(set(numbers))
    assert numbers[-1] <= MAX_PARTS
    for level in range(levels):
        first = reserved_part(assembly, 0, level)
        before = reserved_part(assembly, batches - 1, level + 1) if level + 1 < levels else 0
        assert first - before - 1 == gap

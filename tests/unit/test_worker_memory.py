"""The splitter refuses a tile size whose worker would outgrow its memory, before any work."""

from __future__ import annotations

import pytest

from tilefan import parse_chain
from tilefan.errors import InvalidTileSize, TileTooLarge
from tilefan.imaging.plan import ImageSpec, check_worker_memory, plan_tiles
from tilefan.settings import Settings

pytestmark = pytest.mark.unit

HALO = [{"op": "gaussblur", "sigma": 2}]


def test_the_default_worker_takes_the_largest_tile_of_8_bit_rgb() -> None:
    plan = plan_tiles(ImageSpec(20_000, 20_000, 3, "uchar"), parse_chain(HALO), 8192)
    check_worker_memory(plan, Settings().worker_memory_mb)


def test_a_tile_of_float_rgba_too_large_for_the_worker_is_refused_with_a_size_that_fits() -> None:
    plan = plan_tiles(ImageSpec(20_000, 20_000, 4, "float"), parse_chain(HALO), 8192)
    with pytest.raises(TileTooLarge) as refused:
        check_worker_memory(plan, 2048)
    assert refused.value.code == "TILE_TOO_LARGE"
    assert isinstance(refused.value, InvalidTileSize)
    advised = int(str(refused.value).split("use tile_size ")[1].split(" ")[0])
    check_worker_memory(plan_tiles(plan.spec, plan.chain, advised), 2048)
    with pytest.raises(TileTooLarge):
        check_worker_memory(plan_tiles(plan.spec, plan.chain, advised + 64), 2048)


def test_the_limit_follows_the_pixel_format_and_the_memory() -> None:
    chain = parse_chain(HALO)
    uchar = plan_tiles(ImageSpec(9000, 9000, 1, "uchar"), chain, 4096)
    double = plan_tiles(ImageSpec(9000, 9000, 4, "double"), chain, 4096)
    check_worker_memory(uchar, 512)
    check_worker_memory(double, 10240)
    with pytest.raises(TileTooLarge, match="give the tile worker more memory"):
        check_worker_memory(double, 128)

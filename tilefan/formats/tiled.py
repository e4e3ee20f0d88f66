"""The input as the workers read it: a tiled TIFF on S3, opened by range, cropped per tile.

A tiled TIFF or BigTIFF upload is read where it is. Anything else (JPEG, PNG, WebP, GIF,
HEIF, SVG, strip TIFF) decodes only from the top, so the splitter transcodes it once, streaming,
into a tiled TIFF next to the job's other intermediates.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import pyvips

from tilefan.errors import DamagedImage, reason
from tilefan.formats.chunks import ChunkLayout
from tilefan.formats.remote import ObjectSource, ObjectTarget
from tilefan.formats.source import open_checked, upright
from tilefan.formats.strips import thin_strips
from tilefan.imaging.geometry import Rect
from tilefan.imaging.plan import SAMPLE_BYTES
from tilefan.state.ranged import MultipartObject, RangedObject

if TYPE_CHECKING:
    from tilefan.state.storage import TileStore

__all__ = [
    "TRANSCODE_OPTIONS",
    "open_object",
    "range_readable",
    "source_block",
    "transcode",
    "transcode_tile_edge",
    "transcode_tile_height",
]

TRANSCODE_OPTIONS: dict[str, Any] = {
    "tile": True,
    "compression": "deflate",
    # Level 1: the transcode is one core's work for the whole image, and the file lives
    # until the merge. zstd would be faster still, but this libtiff is built without it.
    "level": 1,
    # An intermediate of more than 4 GiB needs BigTIFF; libvips reads both the same way.
    "bigtiff": True,
}
"""How the splitter writes the intermediate: lossless, fast to write, cut into tiles."""


def range_readable(image: pyvips.Image) -> bool:
    """Whether workers can read ``image``'s tiles where it is: a tiled TIFF or BigTIFF page."""
    loader = str(image.get("vips-loader")) if image.get_typeof("vips-loader") else ""
    return loader.startswith("tiffload") and bool(image.get_typeof("tile-width"))


def transcode_tile_edge(tile_size: int) -> int:
    """The intermediate's TIFF tile width, and the most its height may be: a multiple of 16
    (TIFF's rule) that divides the plan's, at most 256 (`transcode_tile_height` may lower the
    height for a wide image)."""
    return next((edge for edge in (256, 128, 64, 32, 16) if tile_size % edge == 0), 256)


TILE_ROW_BYTES = 12 * 2**20
"""The most the transcode's row of TIFF tiles may hold: a wide image gets shorter tiles, so
what the writer holds stays about the same whatever the image's width."""


def transcode_tile_height(edge: int, image: pyvips.Image) -> int:
    """The intermediate's tile height: ``edge`` halved (down to 16, TIFF's rule) until a row of
    tiles of ``image``'s width fits in `TILE_ROW_BYTES`. It still divides the plan's tile."""
    row = image.width * image.bands * SAMPLE_BYTES.get(str(image.format), 8)
    height = edge
    while height > 16 and height * row > TILE_ROW_BYTES:
        height //= 2
    return height


def open_object(
    store: TileStore, key: str, *, name: str, **checks: Any
) -> tuple[pyvips.Image, ObjectSource]:
    """Open an object by range requests, with the checks of `open_checked`, reading its header.

    ``name`` is what messages call the object.
    """
    source = ObjectSource(RangedObject(store.client, store.bucket, key), name=name)
    return open_checked(source, **checks), source


def transcode(
    image: pyvips.Image, origin: ObjectSource, store: TileStore, key: str, edge: int
) -> int:
    """Decode ``image`` once, top to bottom, into a tiled TIFF uploaded to ``key`` as it fills.

    Memory is one row of tiles and a few rows of pixels of the image's width (`thin_strips`),
    and the parts: they go to S3 while libvips goes on. Returns the object's size. A failed
    transcode leaves no object and no parts behind.
    """
    upload = MultipartObject(store.client, store.bucket, key, "image/tiff")
    target = ObjectTarget(upload)
    try:
        # The loader's buffers are sized when the first pixel is asked for, inside.
        with thin_strips():
            image.tiffsave_target(
                target.target,
                tile_width=edge,
                tile_height=transcode_tile_height(edge, image),
                **TRANSCODE_OPTIONS,
            )
        # A failed read that libvips took as a warning must not pass as a decoded image.
        failure = origin.failure or target.failure
        if failure is not None:
            raise failure
        return upload.complete()
    except pyvips.Error as e:
        upload.abort()
        # A storage error on either side is worth a retry; anything else is the input's.
        failure = origin.failure or target.failure
        if failure is not None:
            raise failure from e
        raise DamagedImage(f"the image could not be decoded: {reason(e)}") from e
    except BaseException:
        upload.abort()
        raise


def source_block(
    store: TileStore, key: str, page: int, rect: Rect, interpretation: str
) -> pyvips.Image:
    """A tile's source rectangle, read by range from the tiled object at ``key``, in memory.

    The TIFF tiles (or strips) under the rectangle are fetched first, a few concurrent requests
    for the lot, so that libtiff, which reads them one at a time, reads them from memory.
    """
    image, source, layout = _opened(store, key, page)
    if layout is not None:
        source.remote.prefetch(layout.ranges(rect))
    try:
        block = image.crop(*rect).copy(interpretation=interpretation).copy_memory()
    except pyvips.Error:
        if source.failure is None:
            raise
    finally:
        source.remote.settle()
    # libtiff can report a failed read of a tile as a warning and go on with the tile blank,
    # so a storage failure is checked for whether libvips raised or not.
    if source.failure is not None:
        failure, source.failure = source.failure, None
        # libvips may remember the failed read; the next attempt opens the object afresh.
        _opened.cache_clear()
        raise failure
    return block


@functools.lru_cache(maxsize=4)
def _opened(
    store: TileStore, key: str, page: int
) -> tuple[pyvips.Image, ObjectSource, ChunkLayout | None]:
    """Each object is opened once per warm worker: its directory is read once, not per tile.

    The page's chunk layout is read from the directory bytes libvips' open has just kept.
    """
    image, source = open_object(store, key, name=key, access="random", page=page)
    return upright(image), source, ChunkLayout.read(source.remote, page)

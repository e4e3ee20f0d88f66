"""The input as the workers read it: a tiled TIFF on S3, opened by range, cropped per tile.

A tiled TIFF or BigTIFF upload is read where it is. Anything else (JPEG, PNG, WebP, GIF,
HEIF, SVG, strip TIFF) decodes only from the top, so the splitter transcodes it once, streaming,
into a tiled TIFF next to the job's other intermediates.
"""

from __future__ import annotations

import collections
import functools
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyvips

from tilefan.errors import DamagedImage, reason
from tilefan.formats.chunks import ChunkLayout
from tilefan.formats.remote import ObjectSource, ObjectTarget
from tilefan.formats.source import open_checked, upright
from tilefan.formats.strips import STREAMING_TILE_HEIGHT, thin_strips
from tilefan.formats.tiff_layout import BIGTIFF_HEADER, Page, Tag, read_tags, trailing_layout
from tilefan.formats.tiff_tiles import deflate_tiles, numpy_dtype, predictable, travelling
from tilefan.imaging.geometry import Rect
from tilefan.imaging.plan import SAMPLE_BYTES
from tilefan.state.ranged import MultipartObject, RangedObject

if TYPE_CHECKING:
    from tilefan.state.storage import TileStore

__all__ = [
    "TRANSCODE_OPTIONS",
    "SeekableWriter",
    "deflate_transcode",
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

_HEADER_FIELDS = frozenset(
    {"width", "height", "bands", "format", "coding", "interpretation"}
    | {"xoffset", "yoffset", "xres", "yres"}
)
"""What a stand-in image has of its own; every other field is the image's metadata."""


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

    8- and 16-bit pixels are compressed here, in threads (`deflate_transcode`); others by
    libvips' ``tiffsave``. Memory is two rows of tiles (one for ``tiffsave``), a few rows of
    pixels of the image's width (`thin_strips`), and the parts: they go to S3 while the decode
    goes on. Returns the object's size. A failed transcode leaves no object and no parts
    behind.
    """
    upload = MultipartObject(store.client, store.bucket, key, "image/tiff")
    target = ObjectTarget(upload)
    height = transcode_tile_height(edge, image)
    try:
        # The loader's buffers are sized when the first pixel is asked for, inside.
        with thin_strips():
            if predictable(image.format):
                deflate_transcode(image, upload, edge, height)
            else:
                image.tiffsave_target(
                    target.target, tile_width=edge, tile_height=height, **TRANSCODE_OPTIONS
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


class SeekableWriter(Protocol):
    """Where `deflate_transcode` writes: a multipart upload, or a file."""

    def write(self, data: bytes | memoryview, /) -> int:
        """Write at the current position; returns the bytes written."""

    def seek(self, offset: int, /) -> int:
        """Move the write position; returns it."""


def deflate_transcode(
    image: pyvips.Image, out: SeekableWriter, tile_width: int, tile_height: int
) -> None:
    """Write ``image`` (8- or 16-bit, `predictable`) as `TRANSCODE_OPTIONS` say (a BigTIFF
    of deflate tiles with the predictor, at level 1), compressing in threads while the next
    row of tiles decodes.

    libvips' ``tiffsave`` compresses on its one writing thread, and for a JPEG that was two
    thirds of the transcode (docs/benchmarks.md). Rows of tiles are fetched in order from one
    region, as a sequential loader requires; two rows of tiles are held, one compressing while
    the next decodes. The tiles follow the header, the IFD follows them, and the header is
    written last (`trailing_layout`).
    """
    width, height = image.width, image.height
    tags = _header_tags(image, tile_width, tile_height)
    region = pyvips.Region.new(image)
    dtype = numpy_dtype(image.format)
    level = int(TRANSCODE_OPTIONS["level"])
    counts: list[int] = []
    in_flight: collections.deque[list[Future[list[memoryview]]]] = collections.deque()

    def write_oldest() -> None:
        for future in in_flight.popleft():
            for tile in future.result():
                counts.append(len(tile))
                out.write(tile)  # the compressor's bytes; the writer copies what it keeps

    # Two rows' buffers, taken in turn: a row's tiles are written, so its buffer is free,
    # before the row after next is fetched. (A fresh array per row let glibc's growing mmap
    # threshold keep freed rows in the heap: 228 MB at 2 GP against 165 MB at 100 MP.)
    buffers = [np.empty((tile_height, width, image.bands), dtype=dtype) for _ in range(2)]
    out.seek(BIGTIFF_HEADER)
    for number, top in enumerate(range(0, height, tile_height)):
        rows = min(tile_height, height - top)
        pixels = buffers[number % 2][:rows]
        # A few rows per fetch: a fetch as high as the tiles grows libvips' buffers to it.
        for y in range(0, rows, STREAMING_TILE_HEIGHT):
            fetched = region.fetch(0, top + y, width, min(STREAMING_TILE_HEIGHT, rows - y))
            pixels[y : y + STREAMING_TILE_HEIGHT] = np.frombuffer(fetched, dtype=dtype).reshape(
                -1, width, image.bands
            )
        in_flight.append(deflate_tiles(pixels, image.format, tile_width, tile_height, level))
        if len(in_flight) > 1:
            write_oldest()
    while in_flight:
        write_oldest()
    page = Page(width, height, tile_width, tags, counts, tile_height=tile_height)
    header, directory = trailing_layout(page)
    out.write(directory)
    out.seek(0)
    out.write(header)


def _header_tags(image: pyvips.Image, tile_width: int, tile_height: int) -> list[Tag]:
    """The tags libvips' ``tiffsave`` writes for ``image`` (its metadata as the header has it
    before any pixel is decoded: a loader may add fields as it decodes), from a blank
    stand-in of one tile, so that nothing of the sequential image is read out of order."""
    stand_in = (
        pyvips.Image.black(
            min(tile_width, image.width), min(tile_height, image.height), bands=image.bands
        )
        .cast(image.format)
        .copy(interpretation=image.interpretation, xres=image.xres, yres=image.yres)
    )
    for name in image.get_fields():
        value = image.get(name)
        if name not in _HEADER_FIELDS and value is not None:  # an unset string is None
            stand_in.set_type(image.get_typeof(name), name, value)
    sample = stand_in.tiffsave_buffer(
        tile=True, tile_width=tile_width, tile_height=tile_height, compression="deflate"
    )
    return travelling(read_tags(sample))


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

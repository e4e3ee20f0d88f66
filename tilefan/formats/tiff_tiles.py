"""TIFF result tiles: how a block of the output becomes encoded TIFF tiles and reduced levels.

A worker's block is encoded by libvips itself (``tiffsave`` of the block, tiled, in the
result's compression), and its tiles are taken out of that small file: the bytes are what
libvips writes for the same tiles of the whole image (deflate with the horizontal predictor
through the same zlib-ng, JPEG through the same libjpeg with the same tables), so pixels are
identical by construction. Blocks start on the TIFF tile grid and are whole tiles except at
the image's right and bottom edges, where libvips pads the last tiles as it would for the
whole image.

Deflate tiles of 8- and 16-bit pixels are the exception: the worker applies the horizontal
predictor itself and compresses with libdeflate at libvips' level, in threads. The bytes
differ from zlib-ng's (3% larger), the decoded pixels are the same, and it takes half the CPU
(docs/benchmarks.md, "Compressing deflate tiles"); deflate is most of a TIFF job's work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import deflate
import numpy as np
import pyvips

from tilefan.formats.tiff_layout import Tag, read_tags, tile_locations

__all__ = [
    "TIFF_TILE",
    "EncodedBlock",
    "TiffEncoding",
    "deflate_tiles",
    "encode_block",
    "from_array",
    "halve",
    "level_sizes",
    "numpy_dtype",
    "power_of_two_block",
    "predictable",
    "tiff_output_tile",
    "to_array",
    "travelling",
    "without_metadata",
]

TIFF_TILE = 256
"""The result's TIFF tile edge, as the whole-image save writes it."""

_METADATA_TAGS = frozenset({700, 33723, 34377, 34665, 34675, 34853, 330, 40965})
"""XMP, IPTC, Photoshop, EXIF, ICC, GPS, SubIFDs, Interop: kept on the first page only;
the pointer tags among them would point into the worker's small file, so they never travel."""
_POINTER_TAGS = frozenset({34665, 34853, 330, 40965})

_NUMPY_FORMATS: dict[str, type[np.generic]] = {
    "uchar": np.uint8,
    "char": np.int8,
    "ushort": np.uint16,
    "short": np.int16,
    "uint": np.uint32,
    "int": np.int32,
    "float": np.float32,
    "double": np.float64,
}


@dataclass(frozen=True)
class TiffEncoding:
    """The result's tile encoding: compression, JPEG quality, and whether it has a pyramid."""

    compression: str = "deflate"
    quality: int = 75
    pyramid: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TiffEncoding:
        """The encoding a job's output options ask for (libvips' defaults where absent)."""
        return cls(
            compression=str(options.get("compression") or "deflate"),
            quality=int(options.get("quality") or 75),
            pyramid=bool(options.get("pyramid", False)),
        )


@dataclass(frozen=True)
class EncodedBlock:
    """A block's tiles, row-major over the block's tile grid, and its TIFF tags."""

    tiles: list[memoryview]
    """Views into the block's encoded file: copied once, where they are kept."""
    tags: list[Tag]


def tiff_output_tile(planned: int) -> int:
    """The output tile for a TIFF result: ``TIFF_TILE`` times the nearest power of two.

    A worker's block is then whole TIFF tiles, and halving it keeps it whole tiles down to
    one tile, so each worker encodes its share of every level that big.
    """
    return power_of_two_block(planned, TIFF_TILE)


def power_of_two_block(planned: int, tile: int) -> int:
    """``tile`` times the power of two (at least 1) that comes nearest to ``planned``."""
    doublings = max(0, round(np.log2(max(planned, 1) / tile)))
    return int(tile * 2**doublings)


def level_sizes(width: int, height: int, *, pyramid: bool) -> list[tuple[int, int]]:
    """Each page's size: halved, odd edges dropped, down to the first that fits one tile.

    This is the rule of libvips' ``tiffsave(pyramid=True)``, which also stops before a
    side would halve to nothing.
    """
    sizes = [(width, height)]
    while pyramid and max(sizes[-1]) > TIFF_TILE and min(sizes[-1]) >= 2:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes


def encode_block(block: pyvips.Image, encoding: TiffEncoding, *, metadata: bool) -> EncodedBlock:
    """Encode ``block`` as tiled TIFF tiles of the result; ``metadata`` keeps ICC, XMP, ...

    The tags are those libvips writes for the block, without the pointers into its file.
    """
    options: dict[str, Any] = {
        "tile": True,
        "tile_width": TIFF_TILE,
        "tile_height": TIFF_TILE,
        "compression": encoding.compression,
    }
    if encoding.compression == "jpeg":
        options["Q"] = encoding.quality
    if not metadata:
        if encoding.compression == "deflate" and predictable(block.format):
            return EncodedBlock(_deflate_tiles(block), [])
        options["keep"] = "none"
    data = block.tiffsave_buffer(**options)
    tags = read_tags(data)
    # Views, not copies: a 4096 px block's level 0 is hundreds of MB encoded (noise).
    view = memoryview(data)
    tiles = [view[offset : offset + count] for offset, count in tile_locations(tags)]
    return EncodedBlock(tiles, travelling(tags))


def travelling(tags: Sequence[Tag]) -> list[Tag]:
    """The tags of a file libvips wrote that can be written into another: without those
    that point into it (the EXIF, GPS, interoperability and sub-IFD directories)."""
    return [tag for tag in tags if tag.code not in _POINTER_TAGS]


_PREDICTED_FORMATS: dict[str, type[np.generic]] = {
    "uchar": np.uint8,
    "char": np.uint8,
    "ushort": np.uint16,
    "short": np.uint16,
}
"""Pixel formats whose deflate tiles the worker makes itself, and the unsigned type libtiff's
horizontal predictor subtracts them in (modulo 2^8 or 2^16, signed or not)."""
_DEFLATE_LEVEL = 6
"""libvips' deflate level (its ``level=0`` is zlib's default, 6)."""
_THREADS = os.cpu_count() or 1
_COMPRESSORS = ThreadPoolExecutor(max_workers=_THREADS)
"""libdeflate releases the GIL: a block's tile rows are compressed on every core."""


def predictable(pixel_format: str) -> bool:
    """Whether `deflate_tiles` takes pixels of ``pixel_format`` (8- and 16-bit integers)."""
    return pixel_format in _PREDICTED_FORMATS


def deflate_tiles(
    pixels: np.ndarray[Any, Any],
    pixel_format: str,
    tile_width: int,
    tile_height: int,
    level: int = _DEFLATE_LEVEL,
) -> list[Future[list[memoryview]]]:
    """Start compressing ``pixels`` (height, width, bands) into TIFF tiles as libtiff writes
    them with deflate and the horizontal predictor: each sample minus the same band's sample
    to its left, edge tiles padded to the full tile. The compressors' threads take runs of a
    tile row each; the futures' tiles, in order, are row-major."""
    unsigned = pixels.view(_PREDICTED_FORMATS[pixel_format])
    across = -(-pixels.shape[1] // tile_width)
    run = -(-across // _THREADS)
    shape = (tile_height, tile_width, pixels.shape[2])
    return [
        _COMPRESSORS.submit(
            _deflate_run,
            unsigned[top : top + tile_height, left * tile_width : (left + run) * tile_width],
            shape,
            level,
        )
        for top in range(0, pixels.shape[0], tile_height)
        for left in range(0, across, run)
    ]


def _deflate_tiles(block: pyvips.Image) -> list[memoryview]:
    """``block``'s deflate TIFF tiles at the result's tile size and libvips' level."""
    futures = deflate_tiles(to_array(block), block.format, TIFF_TILE, TIFF_TILE)
    return [tile for future in futures for tile in future.result()]


def _deflate_run(
    band: np.ndarray[Any, Any], shape: tuple[int, int, int], level: int
) -> list[memoryview]:
    """The compressed tiles of ``band``: one tile high, whole tiles across but the last."""
    tiles = []
    for left in range(0, band.shape[1], shape[1]):
        tile = band[:, left : left + shape[1]]
        if tile.shape != shape:
            padded = np.zeros(shape, dtype=band.dtype)
            padded[: tile.shape[0], : tile.shape[1]] = tile
            tile = padded
        predicted = np.empty(shape, dtype=band.dtype)
        predicted[:, 0] = tile[:, 0]
        np.subtract(tile[:, 1:], tile[:, :-1], out=predicted[:, 1:])
        tiles.append(memoryview(deflate.zlib_compress(predicted, level)))
    return tiles


def without_metadata(tags: Sequence[Tag]) -> list[Tag]:
    """The tags of a reduced page: the first page's, without its metadata blocks."""
    return [tag for tag in tags if tag.code not in _METADATA_TAGS]


def halve(block: pyvips.Image) -> pyvips.Image:
    """The next pyramid level of ``block``, as libvips' ``tiffsave(pyramid=True)`` makes it.

    Each pixel is ``(a + b + c + d + 2) >> 2`` of a 2x2 (float formats: the mean), the odd last
    row or column dropped. With alpha, colour is weighted by alpha: ``sum(c * a) / sum(a)``
    and alpha is ``sum(a) / 4``, both truncated. ``shrink`` is neither: it rounds in two
    steps. A block at even coordinates halves exactly as its part of the whole image does.
    """
    pixels = to_array(block)
    height, width = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    quads = [
        pixels[0:height:2, 0:width:2],
        pixels[0:height:2, 1:width:2],
        pixels[1:height:2, 0:width:2],
        pixels[1:height:2, 1:width:2],
    ]
    # Sums are made in place, in the narrowest type that holds them: beside the block's
    # pixels, a halving holds 3/4 of its size (the sums, the result), not the ten times
    # that int64 copies of each quarter and their sums took.
    mean: np.ndarray[Any, Any]
    if block.hasalpha():
        mean = _alpha_weighted(quads)
    elif pixels.dtype.kind == "f":
        # In the pixel's own precision, added in libvips' order.
        mean = quads[0] + quads[1]
        mean += quads[2]
        mean += quads[3]
        mean /= pixels.dtype.type(4)
    else:
        mean = quads[0].astype(_SUM_TYPES.get(pixels.dtype.type, np.int64))
        for quad in quads[1:]:
            mean += quad
        mean += 2
        mean >>= 2
    return from_array(mean.astype(pixels.dtype, copy=False), block.format, block.interpretation)


_SUM_TYPES: dict[type[np.generic], type[np.generic]] = {
    np.uint8: np.uint16,
    np.int8: np.int16,
    np.uint16: np.uint32,
    np.int16: np.int32,
}
"""The integer type that holds four pixels' sum plus two (32-bit pixels: int64)."""


def _alpha_weighted(quads: Sequence[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """libvips' 2x2 mean of an image whose last band is alpha (computed in double), in the
    pixels' own type."""
    height, width, bands = quads[0].shape
    alpha_sum = np.zeros((height, width, 1))
    colour_sum = np.zeros((height, width, bands - 1))
    for quad in quads:
        alpha = quad[..., -1:]
        alpha_sum += alpha
        colour_sum += np.multiply(quad[..., :-1], alpha, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        colour_sum /= alpha_sum
    colour_sum[np.broadcast_to(alpha_sum == 0, colour_sum.shape)] = 0.0
    alpha_sum /= 4
    mean = np.empty_like(quads[0])
    mean[..., :-1] = np.trunc(colour_sum, out=colour_sum)
    mean[..., -1:] = np.trunc(alpha_sum, out=alpha_sum)
    return mean


def numpy_dtype(pixel_format: str) -> type[np.generic]:
    """The numpy type of a libvips pixel format."""
    return _NUMPY_FORMATS[pixel_format]


def to_array(image: pyvips.Image) -> np.ndarray[Any, Any]:
    """An image's pixels as a (height, width, bands) array."""
    dtype = _NUMPY_FORMATS[image.format]
    return np.frombuffer(image.write_to_memory(), dtype=dtype).reshape(
        image.height, image.width, image.bands
    )


def from_array(
    pixels: np.ndarray[Any, Any], pixel_format: str, interpretation: str
) -> pyvips.Image:
    """A (height, width, bands) array as an image of ``pixel_format``, sharing its memory
    (the array must not change while the image is used)."""
    height, width, bands = pixels.shape
    image = pyvips.Image.new_from_memory(
        np.ascontiguousarray(pixels), width, height, bands, pixel_format
    )
    return image.copy(interpretation=interpretation)

"""TIFF byte layout: read a little-endian IFD's tags, write header and IFDs around tile bytes.

The merger never holds a result's tiles: it writes the header and the IFDs here, and the tile
bytes that workers encoded are placed after them (Cloud Optimized GeoTIFF order: every IFD
first, then the tile data from the smallest level up). Tags travel as raw little-endian
bytes, so any tag libvips wrote for a worker's block is written back unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BIGTIFF_HEADER",
    "CLASSIC_LIMIT",
    "Page",
    "Tag",
    "TiffLayout",
    "layout",
    "read_tags",
    "tile_locations",
    "trailing_layout",
]

CLASSIC_LIMIT = 2**32 - 1
"""Classic TIFF addresses bytes with 32-bit offsets; a larger file must be BigTIFF."""

TILE_OFFSETS = 324
TILE_BYTE_COUNTS = 325
NEW_SUBFILE_TYPE = 254
IMAGE_WIDTH = 256
IMAGE_LENGTH = 257
TILE_WIDTH = 322
TILE_LENGTH = 323

_SHORT, _LONG, _LONG8 = 3, 4, 16
BIGTIFF_HEADER = 16
"""Bytes of a BigTIFF's header: where `trailing_layout`'s tiles start."""
_BIGTIFF_START = b"II+\x00\x08\x00\x00\x00"
"""A little-endian BigTIFF's signature, offset size and reserved bytes; its first IFD's
offset follows."""
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_TYPE_SIZES.update({13: 4, 16: 8, 17: 8, 18: 8})
_INTEGER_FORMATS = {1: "B", 3: "H", 4: "I", 16: "Q"}
_INTEGER_DTYPES: dict[int, np.dtype[np.unsignedinteger[Any]]] = {
    1: np.dtype("<u1"),
    3: np.dtype("<u2"),
    4: np.dtype("<u4"),
    16: np.dtype("<u8"),
}


@dataclass(frozen=True)
class Tag:
    """One IFD entry: its code, TIFF type, value count and value bytes (little-endian)."""

    code: int
    type: int
    count: int
    value: bytes

    @classmethod
    def integers(cls, code: int, values: npt.ArrayLike, type_: int = _LONG) -> Tag:
        """A tag of unsigned integers (a page's tile table is tens of thousands of them)."""
        array = np.asarray(values)
        dtype = _INTEGER_DTYPES[type_]
        if array.size and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
            raise ValueError(f"tag {code}: a value does not fit its TIFF type {type_}")
        return cls(code, type_, int(array.size), array.astype(dtype).tobytes())

    def as_integers(self) -> tuple[int, ...]:
        """The values of an unsigned integer tag."""
        return struct.unpack(f"<{self.count}{_INTEGER_FORMATS[self.type]}", self.value)


@dataclass(frozen=True)
class Page:
    """One image of the result: its size, tile size, tags, and each tile's byte count."""

    width: int
    height: int
    tile: int
    tags: Sequence[Tag]
    """Every tag but the layout ones (size, tile size and tile table are written from above)."""
    byte_counts: npt.ArrayLike
    """Row-major over the page's tile grid."""
    reduced: bool = False
    stored_order: npt.ArrayLike | None = None
    """The row-major tile indices in the order their bytes follow each other in the file;
    None for row-major. Workers' objects are copied whole, so tiles lie in their order."""
    tile_height: int | None = None
    """Where tiles are not square (the splitter's intermediate): their height."""

    @property
    def tile_length(self) -> int:
        """Tile height (TIFF's TileLength)."""
        return self.tile_height or self.tile

    @property
    def tiles_across(self) -> int:
        """Tile columns."""
        return -(-self.width // self.tile)

    @property
    def tiles_down(self) -> int:
        """Tile rows."""
        return -(-self.height // self.tile_length)


@dataclass(frozen=True)
class TiffLayout:
    """The header and IFDs, and where each page's tile data must start."""

    head: bytes
    bigtiff: bool


def read_tags(data: bytes) -> list[Tag]:
    """The tags of the first IFD of a little-endian classic or BigTIFF file."""
    if data[:2] != b"II":
        raise ValueError("only little-endian TIFF is read")
    (version,) = struct.unpack_from("<H", data, 2)
    big = version == 43
    if big:
        (offset,) = struct.unpack_from("<Q", data, 8)
        (count,) = struct.unpack_from("<Q", data, offset)
        entry_size, inline, first = 20, 8, offset + 8
    else:
        (offset,) = struct.unpack_from("<I", data, 4)
        (count,) = struct.unpack_from("<H", data, offset)
        entry_size, inline, first = 12, 4, offset + 2
    tags = []
    for number in range(count):
        at = first + number * entry_size
        code, type_ = struct.unpack_from("<HH", data, at)
        (n,) = struct.unpack_from("<Q" if big else "<I", data, at + 4)
        size = n * _TYPE_SIZES[type_]
        value_at = at + (12 if big else 8)
        if size > inline:
            (value_at,) = struct.unpack_from("<Q" if big else "<I", data, value_at)
        tags.append(Tag(code, type_, n, bytes(data[value_at : value_at + size])))
    return tags


def tile_locations(tags: Sequence[Tag]) -> list[tuple[int, int]]:
    """(offset, byte count) of each tile, from a page's TileOffsets and TileByteCounts."""
    by_code = {tag.code: tag for tag in tags}
    offsets = by_code[TILE_OFFSETS].as_integers()
    counts = by_code[TILE_BYTE_COUNTS].as_integers()
    return list(zip(offsets, counts, strict=True))


def layout(pages: Sequence[Page], *, bigtiff_above: int = CLASSIC_LIMIT) -> tuple[TiffLayout, int]:
    """Header and IFDs for ``pages``, the data of page ``-1`` first and of page ``0`` last.

    Returns the layout and the total file size. The tile data of each page follows in its
    stored order, the last (smallest) page's directly after the head; BigTIFF is chosen when
    the classic file would pass ``bigtiff_above`` bytes.
    """
    data_bytes = sum(int(_counts(page).sum()) for page in pages)
    limit = min(bigtiff_above, CLASSIC_LIMIT)
    # The classic head is measured only when its offsets fit its 32 bits.
    bigtiff = (
        data_bytes > limit or len(_head(pages, bigtiff=False, data_start=0)) + data_bytes > limit
    )
    head_size = len(_head(pages, bigtiff=bigtiff, data_start=0))
    head = _head(pages, bigtiff=bigtiff, data_start=head_size)
    return TiffLayout(head, bigtiff), head_size + data_bytes


def trailing_layout(page: Page) -> tuple[bytes, bytes]:
    """The header and the IFD of a one-page BigTIFF whose tiles, row-major, follow its
    16-byte header and whose IFD follows the tiles.

    A streamed writer's layout: the tiles' offsets and the IFD's place are known once every
    tile is written, and only the header, which points to the IFD, is written back (a head of
    IFDs before the data, as `layout` makes, could pass the part a multipart upload holds).
    """
    counts = _counts(page)
    data_end = BIGTIFF_HEADER + int(counts.sum())
    offsets = np.cumsum(counts) - counts + np.uint64(BIGTIFF_HEADER)
    directory = bytearray()
    _append_ifd(directory, None, _page_tags(page, offsets, True), True, base=data_end)
    header = _BIGTIFF_START + struct.pack("<Q", data_end + data_end % 2)
    return header, bytes(directory)


def _head(pages: Sequence[Page], *, bigtiff: bool, data_start: int) -> bytes:
    """The header and every IFD, each followed by its out-of-line values."""
    offsets_per_page = []
    position = data_start
    for page in reversed(pages):
        counts = _counts(page)
        order = (
            np.arange(counts.size)
            if page.stored_order is None
            else np.asarray(page.stored_order, dtype=np.int64)
        )
        stored = counts[order]
        page_offsets = np.zeros_like(counts)
        page_offsets[order] = np.cumsum(stored) - stored + np.uint64(position)
        position += int(stored.sum())
        offsets_per_page.append(page_offsets)
    offsets_per_page.reverse()

    head = bytearray(_BIGTIFF_START + bytes(8) if bigtiff else b"II*\x00" + bytes(4))
    pointer_at = 8 if bigtiff else 4
    for page, tile_offsets in zip(pages, offsets_per_page, strict=True):
        pointer_at = _append_ifd(head, pointer_at, _page_tags(page, tile_offsets, bigtiff), bigtiff)
    return bytes(head)


def _counts(page: Page) -> npt.NDArray[np.uint64]:
    return np.asarray(page.byte_counts, dtype=np.uint64)


def _page_tags(page: Page, tile_offsets: npt.NDArray[np.uint64], bigtiff: bool) -> list[Tag]:
    layout_codes = {
        NEW_SUBFILE_TYPE,
        IMAGE_WIDTH,
        IMAGE_LENGTH,
        TILE_WIDTH,
        TILE_LENGTH,
        TILE_OFFSETS,
        TILE_BYTE_COUNTS,
    }
    tags = [tag for tag in page.tags if tag.code not in layout_codes]
    size_type = _LONG
    tags += [
        Tag.integers(IMAGE_WIDTH, [page.width], size_type),
        Tag.integers(IMAGE_LENGTH, [page.height], size_type),
        Tag.integers(TILE_WIDTH, [page.tile], _SHORT),
        Tag.integers(TILE_LENGTH, [page.tile_length], _SHORT),
        Tag.integers(TILE_OFFSETS, tile_offsets, _LONG8 if bigtiff else _LONG),
        Tag.integers(TILE_BYTE_COUNTS, page.byte_counts, _LONG8 if bigtiff else _LONG),
    ]
    if page.reduced:
        tags.append(Tag.integers(NEW_SUBFILE_TYPE, [1]))
    return sorted(tags, key=lambda tag: tag.code)


def _append_ifd(
    head: bytearray, pointer_at: int | None, tags: Sequence[Tag], bigtiff: bool, base: int = 0
) -> int:
    """Append an IFD to ``head`` (which starts at byte ``base`` of the file), link it from
    ``pointer_at`` in ``head`` unless None; returns where in ``head`` its next-IFD pointer is."""
    pointer, count_format, entry_size, inline = (
        ("<Q", "<Q", 20, 8) if bigtiff else ("<I", "<H", 12, 4)
    )
    if (base + len(head)) % 2:
        head += b"\x00"  # an IFD starts on a word boundary
    ifd_at = base + len(head)
    if pointer_at is not None:
        struct.pack_into(pointer, head, pointer_at, ifd_at)
    count_size = struct.calcsize(count_format)
    pointer_size = struct.calcsize(pointer)
    values_at = ifd_at + count_size + len(tags) * entry_size + pointer_size
    entries = bytearray(struct.pack(count_format, len(tags)))
    values = bytearray()
    for tag in tags:
        entries += struct.pack("<HH", tag.code, tag.type)
        entries += struct.pack(pointer, tag.count)
        if len(tag.value) <= inline:
            entries += tag.value.ljust(inline, b"\x00")
        else:
            entries += struct.pack(pointer, values_at + len(values))
            values += tag.value
            if len(values) % 2:
                values += b"\x00"  # TIFF values start on a word boundary
    next_pointer_at = len(head) + len(entries)
    entries += bytes(pointer_size)
    head += entries + values
    return next_pointer_at

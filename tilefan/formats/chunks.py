"""Where a TIFF page's tiles or strips lie in the object, so a worker fetches its block at once.

libtiff asks for one TIFF tile at a time, each a full S3 round trip: a 1024 px block of 256 px
tiles with its halo is 25 requests one after another. The page's TileOffsets and
TileByteCounts (StripOffsets and StripByteCounts) say which bytes a rectangle needs, so a
worker can fetch them all before libvips crops, in a few concurrent requests.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, cast

import tifffile

from tilefan.imaging.geometry import Rect

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from tilefan.state.ranged import RangedObject

__all__ = ["ChunkLayout"]

_UNREADABLE = (tifffile.TiffFileError, ValueError, IndexError, KeyError, struct.error)
"""What tifffile raises on a directory it cannot follow (libvips may still read the page)."""


@dataclass(frozen=True)
class ChunkLayout:
    """One page's chunks (TIFF tiles, or strips: a strip is a chunk the page's width wide)."""

    width: int
    height: int
    chunk_width: int
    chunk_height: int
    planes: int
    """1 for interleaved samples; the samples per pixel when each is stored apart."""
    orientation: int
    """TIFF Orientation (EXIF's values): workers crop the page upright, as libvips shows it."""
    offsets: tuple[int, ...]
    byte_counts: tuple[int, ...]

    @classmethod
    def read(cls, remote: RangedObject, page: int) -> ChunkLayout | None:
        """Page ``page``'s layout, read through ``remote`` (its directory is already kept
        there once libvips has opened the object), or None where tifffile cannot follow it."""
        try:
            # A raw binary stream is what tifffile reads; typeshed does not call it IO[bytes].
            with tifffile.TiffFile(cast("IO[bytes]", _ObjectFile(remote))) as tiff:
                directory = tiff.pages[page]
                assert isinstance(directory, tifffile.TiffPage)
                tiled = directory.is_tiled
                separate = directory.planarconfig == tifffile.PLANARCONFIG.SEPARATE
                return cls(
                    width=directory.imagewidth,
                    height=directory.imagelength,
                    chunk_width=directory.tilewidth if tiled else directory.imagewidth,
                    chunk_height=directory.tilelength if tiled else directory.rowsperstrip,
                    planes=directory.samplesperpixel if separate else 1,
                    orientation=int(directory.tags.valueof(274, 1)),
                    offsets=tuple(int(offset) for offset in directory.dataoffsets),
                    byte_counts=tuple(int(count) for count in directory.databytecounts),
                )
        except _UNREADABLE:
            return None

    def ranges(self, rect: Rect) -> list[tuple[int, int]]:
        """Byte ranges (start, end) of the chunks that ``rect`` of the upright page touches."""
        x, y, w, h = self._stored(rect)
        left, top = max(x, 0), max(y, 0)
        right, bottom = min(x + w, self.width), min(y + h, self.height)
        if left >= right or top >= bottom:
            return []
        across = -(-self.width // self.chunk_width)
        down = -(-self.height // self.chunk_height)
        columns = range(left // self.chunk_width, (right - 1) // self.chunk_width + 1)
        rows = range(top // self.chunk_height, (bottom - 1) // self.chunk_height + 1)
        chunks = (
            plane * across * down + row * across + column
            for plane in range(self.planes)
            for row in rows
            for column in columns
        )
        return sorted(
            (self.offsets[chunk], self.offsets[chunk] + self.byte_counts[chunk])
            for chunk in chunks
            if chunk < len(self.offsets) and self.byte_counts[chunk]
        )

    def _stored(self, rect: Rect) -> Rect:
        """``rect`` of the upright page (what `upright` shows) as a rectangle of the stored one."""
        x, y, w, h = rect
        if self.orientation >= 5:  # the axes are swapped: columns shown are rows stored
            x, y, w, h = y, x, h, w
        # Which stored axes run backwards, for each of EXIF's eight orientations.
        flip_x, flip_y = {
            2: (True, False),
            3: (True, True),
            4: (False, True),
            6: (False, True),
            7: (True, True),
            8: (True, False),
        }.get(self.orientation, (False, False))
        if flip_x:
            x = self.width - x - w
        if flip_y:
            y = self.height - y - h
        return Rect(x, y, w, h)


class _ObjectFile(io.RawIOBase):
    """A read-only, seekable file over a ranged object, for tifffile."""

    def __init__(self, remote: RangedObject) -> None:
        super().__init__()
        self.remote = remote
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.remote.read(self.position, len(view))
        view[: len(data)] = data
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.remote.size}
        self.position = base[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

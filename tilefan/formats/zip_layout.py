"""A zip archive of stored entries, laid out in pieces written apart.

Each entry is a local header followed by its bytes, uncompressed: a worker can write its
tiles' entries into one object knowing nothing of where they will lie in the archive, because
a local header holds no offset. The merger then writes the central directory, which does say
where each entry starts, after every entry (zip64 records when an offset, a size or the entry
count passes what the classic fields hold).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ZipEntry", "central_directory", "local_entry"]

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")

_DOS_DATE = 0x21
"""1980-01-01, the DOS epoch, as libvips' own zips carry (with time 0): no clock in the bytes."""
_UNIX_FILE = (0o100644 << 16) | 0
"""External attributes of a regular file readable by all, made on Unix (version 3.x)."""
_MADE_BY = (3 << 8) | 45
_CLASSIC = 20
_ZIP64 = 45
_MAX32 = 0xFFFFFFFF
_MAX16 = 0xFFFF


@dataclass(frozen=True)
class ZipEntry:
    """One stored entry: its name, checksum, size and where its local header starts."""

    name: str
    crc32: int
    size: int
    offset: int


def local_entry(name: str, data: bytes) -> tuple[bytes, int]:
    """The local header and bytes of a stored entry, and the entry's CRC-32."""
    encoded = name.encode()
    crc = zlib.crc32(data)
    header = _LOCAL.pack(
        0x04034B50, _CLASSIC, 0x800, 0, 0, _DOS_DATE, crc, len(data), len(data), len(encoded), 0
    )
    return header + encoded + data, crc


def central_directory(entries: Iterable[ZipEntry], start: int) -> bytes:
    """The central directory of ``entries`` and the end records, for a directory at ``start``."""
    records = bytearray()
    count = 0
    for entry in entries:
        count += 1
        name = entry.name.encode()
        far = entry.offset >= _MAX32
        extra = struct.pack("<HHQ", 0x0001, 8, entry.offset) if far else b""
        records += _CENTRAL.pack(
            0x02014B50,
            _MADE_BY,
            _ZIP64 if far else _CLASSIC,
            0x800,
            0,
            0,
            _DOS_DATE,
            entry.crc32,
            entry.size,
            entry.size,
            len(name),
            len(extra),
            0,
            0,
            0,
            _UNIX_FILE,
            _MAX32 if far else entry.offset,
        )
        records += name + extra
    end = start + len(records)
    if count < _MAX16 and end < _MAX32:
        return bytes(records) + _END.pack(0x06054B50, 0, 0, count, count, len(records), start, 0)
    zip64 = _END64.pack(
        0x06064B50, _END64.size - 12, _MADE_BY, _ZIP64, 0, 0, count, count, len(records), start
    )
    locator = _LOCATOR64.pack(0x07064B50, 0, end, 1)
    classic_end = _END.pack(0x06054B50, 0, 0, _MAX16, _MAX16, min(len(records), _MAX32), _MAX32, 0)
    return bytes(records) + zip64 + locator + classic_end

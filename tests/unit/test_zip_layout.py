"""Zips laid out in pieces: stored entries written apart, the directory written last."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tilefan.formats.zip_layout import ZipEntry, central_directory, local_entry

pytestmark = pytest.mark.unit


def archive(files: list[tuple[str, bytes]], gap: int = 0) -> tuple[bytes, list[ZipEntry]]:
    """The entries one after the other from offset ``gap``, and their directory records."""
    body, entries = bytearray(), []
    for name, data in files:
        entry, crc = local_entry(name, data)
        entries.append(ZipEntry(name, crc, len(data), gap + len(body)))
        body += entry
    return bytes(body), entries


def test_entries_written_apart_read_back_with_pythons_zipfile(tmp_path: Path) -> None:
    files = [
        ("result_files/12/0_0.jpeg", b"\xff\xd8 a tile"),
        ("result.dzi", b"<Image/>"),
        ("é", b""),
    ]
    body, entries = archive(files)
    path = tmp_path / "a.zip"
    path.write_bytes(body + central_directory(entries, len(body)))
    with zipfile.ZipFile(path) as read:
        assert read.testzip() is None
        assert [(info.filename, read.read(info)) for info in read.infolist()] == files
        assert {info.compress_type for info in read.infolist()} == {zipfile.ZIP_STORED}


def test_more_than_65535_entries_get_zip64_end_records(tmp_path: Path) -> None:
    files = [(f"t/{i}", i.to_bytes(3, "little")) for i in range(70_000)]
    body, entries = archive(files)
    directory = central_directory(entries, len(body))
    assert b"PK\x06\x06" in directory[-200:]  # the zip64 end record
    path = tmp_path / "many.zip"
    path.write_bytes(body + directory)
    with zipfile.ZipFile(path) as read:
        assert len(read.infolist()) == 70_000
        assert read.read("t/69999") == (69_999).to_bytes(3, "little")


def test_entries_past_4_gib_carry_their_offset_in_a_zip64_extra(tmp_path: Path) -> None:
    """A sparse file: 4.5 GiB of nothing before the entries, which the directory points past."""
    gap = 4 * 2**30 + 2**29
    body, entries = archive([("far/0_0.png", b"tile bytes"), ("far.dzi", b"<Image/>")], gap)
    path = tmp_path / "far.zip"
    with path.open("wb") as out:
        out.truncate(gap)
        out.seek(gap)
        out.write(body + central_directory(entries, gap + len(body)))
    with zipfile.ZipFile(path) as read:
        assert [info.header_offset for info in read.infolist()] == [e.offset for e in entries]
        assert read.read("far/0_0.png") == b"tile bytes"
        assert read.read("far.dzi") == b"<Image/>"

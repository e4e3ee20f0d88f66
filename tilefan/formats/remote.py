"""libvips sources and targets over S3 objects: read by range, write by multipart upload."""

from __future__ import annotations

import os

import pyvips

from tilefan.errors import TilefanError
from tilefan.state.ranged import MultipartObject, RangedObject

__all__ = ["ObjectSource", "ObjectTarget"]

_FAILED = -1
"""What a libvips callback returns to say the read, write or seek failed."""


class ObjectSource:
    """A libvips source over a ranged S3 object, with a read position.

    libvips sees a failed storage read as a failed read; the storage error itself is kept in
    ``failure``, so the caller can raise it (a throttled read is worth retrying, a damaged
    image is not).
    """

    def __init__(self, remote: RangedObject, *, name: str | None = None) -> None:
        self.remote = remote
        self.name = name or remote.key
        self.position = 0
        self.failure: TilefanError | None = None
        self.source = pyvips.SourceCustom()
        self.source.signal_connect("read", self._read)
        self.source.signal_connect("seek", self._seek)

    def head(self, length: int) -> bytes:
        """The object's first ``length`` bytes (a format's signature)."""
        return self.remote.read(0, length)

    def _read(self, buffer: memoryview) -> int:
        try:
            data = self.remote.read(self.position, len(buffer))
        except TilefanError as e:
            self.failure = e
            return _FAILED
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def _seek(self, offset: int, whence: int) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.remote.size}
        position = base[whence] + offset
        if position < 0:
            return _FAILED
        self.position = position
        return position


class ObjectTarget:
    """A libvips target that writes a multipart S3 object as libvips produces the bytes."""

    def __init__(self, upload: MultipartObject) -> None:
        self.upload = upload
        self.failure: TilefanError | None = None
        self.target = pyvips.TargetCustom()
        self.target.signal_connect("write", self._write)
        self.target.signal_connect("seek", self._seek)
        self.target.on_end(lambda: 0)

    def _write(self, buffer: memoryview) -> int:
        try:
            return self.upload.write(bytes(buffer))
        except TilefanError as e:
            self.failure = e
            return _FAILED

    def _seek(self, offset: int, whence: int) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.upload.position, os.SEEK_END: self.upload.size}
        return self.upload.seek(base[whence] + offset)

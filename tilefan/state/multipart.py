"""Objects written to S3 by multipart upload, never staged on disk.

`MultipartWriter` takes an encoder's bytes as they come and uploads them part by part;
`assemble_object` lays an object out of bytes and byte ranges of other objects, copying ranges
of at least 5 MiB server-side (``UploadPartCopy``) and gathering smaller pieces into plain
parts, so every part but the last passes S3's 5 MiB minimum. It can finish an upload that
others opened (`open_upload`) and already copied ranges into, at part numbers reserved for
them: those parts are taken as they are, checked against the upload's own list of parts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from tilefan.errors import TilefanError
from tilefan.state._transport import AWS_ERRORS
from tilefan.state.storage import TileStore
from tilefan.state.storage import _translate as translate_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = [
    "CONNECTIONS",
    "MAX_PARTS",
    "MIN_PART",
    "MIN_PART_SIZE",
    "MultipartWriter",
    "Range",
    "TooManyParts",
    "abort_uploads",
    "assemble_object",
    "copy_part",
    "open_upload",
    "put_joined",
]

MIN_PART = 5 * 2**20
"""S3's smallest part, except the last."""
MAX_PARTS = 10_000

_PLAIN_PART = 8 * 2**20
"""A plain part is sent once this many bytes are gathered."""

_TRANSFERS = 16
"""Requests `assemble_object` keeps in flight: parts copied or sent, and ranges read."""

CONNECTIONS = 2 * _TRANSFERS
"""Connections the S3 client of a stage that assembles must keep: its transfers and its
reads in flight at once. botocore keeps 10 by default and opens, then drops, a connection for
each request past them (on AWS, a TLS handshake each time)."""

_PLAIN_PARTS_IN_FLIGHT = 4
"""Of those, plain parts (8 MiB each, held until sent): the merger holds at most about
five parts' bytes however large the result."""


class TooManyParts(TilefanError):
    """The result would need more than S3's 10,000 multipart parts."""

    code = "TOO_MANY_PARTS"


@dataclass(frozen=True)
class Range:
    """``length`` bytes of object ``key`` from ``start``."""

    key: str
    start: int
    length: int
    part: int = 0
    """The part number reserved for this range in a prepared upload, or 0."""
    etag: str = ""
    """The ETag its copy into ``part`` returned, when one was made."""


def open_upload(store: TileStore, key: str, content_type: str) -> str:
    """Open a multipart upload of ``key`` for others to copy parts into; returns its id."""
    try:
        return store.client.create_multipart_upload(
            Bucket=store.bucket, Key=key, ContentType=content_type
        )["UploadId"]
    except AWS_ERRORS as e:
        raise translate_error(e, key) from e


def copy_part(store: TileStore, key: str, upload_id: str, number: int, piece: Range) -> str:
    """Copy ``piece`` server-side into part ``number`` of an open upload of ``key``; returns
    the part's ETag. Raises botocore's errors as they come."""
    last = piece.start + piece.length - 1
    return store.client.upload_part_copy(
        Bucket=store.bucket,
        Key=key,
        UploadId=upload_id,
        PartNumber=number,
        CopySource={"Bucket": store.bucket, "Key": piece.key},
        CopySourceRange=f"bytes={piece.start}-{last}",
    )["CopyPartResult"]["ETag"]


def abort_uploads(store: TileStore, prefix: str) -> int:
    """Abort every multipart upload still open under ``prefix``; returns how many.

    S3 keeps, and bills, the parts of an upload nobody completes (the bucket's lifecycle
    rule drops them only days later)."""
    aborted = 0
    paginator = store.client.get_paginator("list_multipart_uploads")
    try:
        for page in paginator.paginate(Bucket=store.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                store.client.abort_multipart_upload(
                    Bucket=store.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
    except AWS_ERRORS as e:
        if not _gone(e):  # aborted meanwhile by another stage
            raise translate_error(e, prefix) from e
    return aborted


def _gone(error: Exception) -> bool:
    """Whether S3 answered that the upload is no longer open (completed or aborted)."""
    return isinstance(error, ClientError) and (
        error.response.get("Error", {}).get("Code") == "NoSuchUpload"
    )


def _uploaded_parts(store: TileStore, key: str, upload_id: str) -> dict[int, tuple[str, int]]:
    """The parts an open upload holds, by number: (ETag, size); raises botocore's errors
    (NoSuchUpload when the upload was completed or aborted)."""
    parts: dict[int, tuple[str, int]] = {}
    paginator = store.client.get_paginator("list_parts")
    for page in paginator.paginate(Bucket=store.bucket, Key=key, UploadId=upload_id):
        for part in page.get("Parts", []):
            parts[part["PartNumber"]] = (part["ETag"], part["Size"])
    return parts


def _unreserved(piece: bytes | Range) -> bytes | Range:
    return Range(piece.key, piece.start, piece.length) if isinstance(piece, Range) else piece


@dataclass(frozen=True)
class _Part:
    """One part of an assembled object: gathered pieces sent as they are joined, or a range
    copied, unless (``etag``) the upload holds that copy already."""

    number: int
    gathered: tuple[bytes | Range, ...] = ()
    copy: Range | None = None
    etag: str = ""


class _Taken(Exception):
    """A reserved part number was taken by the parts before its range."""


def _plan(pieces: Iterable[bytes | Range], held: Mapping[int, tuple[str, int]]) -> Iterator[_Part]:
    """The parts of ``pieces``, numbered, as they come: ranges of at least 5 MiB copied, the
    rest gathered into plain parts of `_PLAIN_PART`; a short plain part is topped up from
    the head of the next range, so the rest of that range can still be copied. A range with
    a reserved ``part`` goes to that number, and when ``held`` (the upload's parts, by
    number: ETag and size) has the very copy its ETag names, it is taken as it is."""
    number = 0
    gathered: list[bytes | Range] = []
    gathered_bytes = 0

    def numbered(reserved: int) -> int:
        nonlocal number
        if reserved and reserved <= number:
            raise _Taken
        number = reserved or number + 1
        if number > MAX_PARTS:
            raise TooManyParts(
                f"the result needs more than {MAX_PARTS:,} upload parts; use larger tiles"
            )
        return number

    def flush() -> _Part:
        nonlocal gathered_bytes
        part = _Part(numbered(0), gathered=tuple(gathered))
        gathered.clear()
        gathered_bytes = 0
        return part

    for piece in pieces:
        if isinstance(piece, Range):
            need = max(0, MIN_PART - gathered_bytes) if gathered else 0
            if piece.length - need >= MIN_PART:
                if need:
                    gathered.append(Range(piece.key, piece.start, need))
                    piece = Range(piece.key, piece.start + need, piece.length - need, piece.part)
                if gathered:
                    yield flush()
                if piece.part and held.get(piece.part) == (piece.etag, piece.length):
                    yield _Part(numbered(piece.part), copy=piece, etag=piece.etag)
                else:
                    yield _Part(numbered(piece.part), copy=piece)
                continue
            gathered.append(piece)
            gathered_bytes += piece.length
        else:
            gathered.append(bytes(piece))
            gathered_bytes += len(piece)
        if gathered_bytes >= _PLAIN_PART:
            yield flush()
    if gathered or not number:
        yield flush()


def _done(part: CompletedPartTypeDef) -> Future[CompletedPartTypeDef]:
    future: Future[CompletedPartTypeDef] = Future()
    future.set_result(part)
    return future


def assemble_object(
    store: TileStore,
    key: str,
    pieces: Iterable[bytes | Range],
    content_type: str,
    *,
    upload_id: str | None = None,
) -> int:
    """Write ``pieces`` one after the other as object ``key``; returns its size in bytes.

    Parts are copied and sent, and small ranges read, ``_TRANSFERS`` at a time: each is a
    request with S3's latency, and a large result has thousands. What is held is bounded by
    the plain parts in flight (``_PLAIN_PARTS_IN_FLIGHT``) and the one being gathered.

    With ``upload_id``, the upload `open_upload` opened is completed, and a range with a
    reserved ``part`` goes to that part number: taken as it is when the upload holds the
    copy its ETag names, copied again otherwise (a copy that failed or never ran). The
    other parts take the numbers between. When they do not fit there, every range is
    placed as without reservations; when the upload is gone (a retry after it completed),
    a new one is made.
    """
    client, bucket = store.client, store.bucket
    held: dict[int, tuple[str, int]] = {}
    if upload_id is not None:
        try:
            held = _uploaded_parts(store, key, upload_id)
        except AWS_ERRORS as e:
            if not _gone(e):
                raise translate_error(e, key) from e
            upload_id = None
    prepared = upload_id is not None
    plan: Iterable[_Part]
    if prepared:
        pieces = list(pieces)
        try:
            plan = list(_plan(pieces, held))
        except _Taken:
            plan = _plan(map(_unreserved, pieces), {})
    else:
        plan = _plan(map(_unreserved, pieces), {})
    if upload_id is None:
        upload_id = open_upload(store, key, content_type)
    reads = ThreadPoolExecutor(_TRANSFERS)
    writes = ThreadPoolExecutor(_TRANSFERS)
    parts: list[Future[CompletedPartTypeDef]] = []
    plain: list[Future[CompletedPartTypeDef]] = []
    size = 0

    def upload(number: int, body: list[bytes | Future[bytes]]) -> CompletedPartTypeDef:
        data = b"".join(piece if isinstance(piece, bytes) else piece.result() for piece in body)
        body.clear()  # the pieces go now: a part in flight holds its bytes once, not twice
        etag = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )["ETag"]
        return {"PartNumber": number, "ETag": etag}

    def copy(number: int, piece: Range) -> CompletedPartTypeDef:
        return {"PartNumber": number, "ETag": copy_part(store, key, upload_id, number, piece)}

    def submit(task: Callable[..., CompletedPartTypeDef], number: int, argument: object) -> None:
        in_flight = [part for part in parts[-2 * _TRANSFERS :] if not part.done()]
        if len(in_flight) >= _TRANSFERS:
            in_flight[0].result()
        parts.append(writes.submit(task, number, argument))

    def read(piece: bytes | Range) -> bytes | Future[bytes]:
        if isinstance(piece, bytes):
            return piece
        return reads.submit(store.get_range, piece.key, piece.start, piece.length)

    try:
        for part in plan:
            if part.copy is not None:
                size += part.copy.length
                if part.etag:
                    parts.append(_done({"PartNumber": part.number, "ETag": part.etag}))
                else:
                    submit(copy, part.number, part.copy)
            else:
                size += sum(p.length if isinstance(p, Range) else len(p) for p in part.gathered)
                # Plain parts hold their bytes until sent: fewer of them in flight than copies.
                pending = [p for p in plain[-_PLAIN_PARTS_IN_FLIGHT:] if not p.done()]
                if len(pending) >= _PLAIN_PARTS_IN_FLIGHT:
                    pending[0].result()
                submit(upload, part.number, [read(piece) for piece in part.gathered])
                plain.append(parts[-1])
        completed = [part.result() for part in parts]
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": completed}
        )
    except BaseException as e:
        writes.shutdown(cancel_futures=True)
        reads.shutdown(cancel_futures=True)
        # A failed assembly leaves no parts behind to be billed; a prepared upload stays for
        # the retry, and goes when the job ends (`abort_uploads`).
        if not prepared:
            with contextlib.suppress(*AWS_ERRORS):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        if isinstance(e, AWS_ERRORS):
            raise translate_error(e, key) from e
        raise
    finally:
        writes.shutdown()
        reads.shutdown()
    return size


MIN_PART_SIZE = 8 * 2**20
"""S3 takes parts from 5 MiB (the last may be smaller); 8 MiB keeps 10,000 parts at 78 GiB."""

_JOINED_UP_TO = 2 * MIN_PART_SIZE
"""`put_joined` sends an object up to this size in one PUT, joined first."""

_PARTS_IN_FLIGHT = 2
"""Parts uploading while the encoder fills the next: memory is at most this many plus one."""


def put_joined(
    store: TileStore, key: str, size: int, buffers: Iterable[bytes | bytearray | memoryview]
) -> None:
    """Write ``buffers`` (``size`` bytes in all) one after the other as object ``key``.

    Up to `_JOINED_UP_TO` they are joined and sent in one PUT; above it they go by multipart
    upload a part-size slice at a time, never joined, so what is held beside them is a few
    parts. A buffer the iterable no longer refers to is freed once it is sent: a worker's
    batch of encoded levels (hundreds of MB at 4096 px) is not held twice.
    """
    if size <= _JOINED_UP_TO:
        store.put_bytes(key, b"".join(buffers))
        return
    with MultipartWriter(
        store.client,
        store.bucket,
        key,
        content_type="application/octet-stream",
        expected_bytes=size,
    ) as writer:
        for buffer in buffers:
            view = memoryview(buffer)
            for start in range(0, len(view), writer.part_size):
                writer.write(view[start : start + writer.part_size])
            del view, buffer
        writer.close()


class MultipartWriter:
    """A file-like sink: bytes written fill parts that upload in the background.

    `close` uploads the last part and completes the upload; leaving the ``with`` block on an
    exception aborts it, so no half-written object or orphaned parts stay behind. Nothing
    touches local disk; memory is `part_size` times `_PARTS_IN_FLIGHT` + 1.
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        key: str,
        *,
        content_type: str,
        expected_bytes: int = 0,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.key = key
        # Parts grow with the size the object is expected to have, with a tenth of the parts
        # spare for an encoding larger than its pixels (a PNG of noise, by a few bytes a line).
        self.part_size = max(MIN_PART_SIZE, -(-expected_bytes // (MAX_PARTS * 9 // 10)))
        self.size = 0
        self._buffer = bytearray()
        self._parts: list[Future[CompletedPartTypeDef]] = []
        self._failure: BaseException | None = None
        self._slots = threading.BoundedSemaphore(_PARTS_IN_FLIGHT)
        self._pool = ThreadPoolExecutor(_PARTS_IN_FLIGHT, thread_name_prefix="part")
        try:
            created = client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType=content_type
            )
        except AWS_ERRORS as e:
            self._pool.shutdown()
            raise translate_error(e, key) from e
        self.upload_id = created["UploadId"]

    def __enter__(self) -> MultipartWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is not None:
            self.abort()

    def write(self, data: bytes | memoryview) -> int:
        """Take ``data``; a full part starts uploading (waiting while two are in flight)."""
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) >= self.part_size:
            part = bytes(self._buffer[: self.part_size])
            del self._buffer[: self.part_size]
            self._send(part)
        return len(data)

    def close(self) -> None:
        """Upload what is left as the last part and complete the object."""
        if self._buffer or not self._parts:
            self._send(bytes(self._buffer))
        self._buffer = bytearray()
        parts = [part.result() for part in self._parts]
        self._pool.shutdown()
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )
        except AWS_ERRORS as e:
            raise translate_error(e, self.key) from e

    def abort(self) -> None:
        """Stop: drop the parts, so S3 keeps (and bills) nothing of this upload."""
        self._pool.shutdown(cancel_futures=True)
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
            )
        except AWS_ERRORS as e:
            raise translate_error(e, self.key) from e

    def _send(self, body: bytes) -> None:
        if len(self._parts) >= MAX_PARTS:
            raise TooManyParts(f"{self.key} needs more than {MAX_PARTS:,} parts")
        if self._failure is not None:
            raise self._failure  # a part that failed stops the writer now, not at the end
        self._slots.acquire()
        number = len(self._parts) + 1
        future = self._pool.submit(self._upload_part, number, body)
        future.add_done_callback(self._part_done)
        self._parts.append(future)

    def _part_done(self, part: Future[CompletedPartTypeDef]) -> None:
        self._slots.release()
        if not part.cancelled() and part.exception() is not None and self._failure is None:
            self._failure = part.exception()

    def _upload_part(self, number: int, body: bytes) -> CompletedPartTypeDef:
        try:
            answer = self.client.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
            )
        except AWS_ERRORS as e:
            raise translate_error(e, self.key) from e
        return {"PartNumber": number, "ETag": answer["ETag"]}

"""One object read by range requests, or written by a multipart upload, a block at a time."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from tilefan.errors import TilefanError, TransientError

# The same codes as every other storage call: one table of which errors retry.
from tilefan.state.storage import _translate

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["MultipartObject", "RangedObject", "coalesce", "storage_errors"]

BLOCK_SIZE = 64 * 2**10
"""Reads shorter than this fetch the aligned block around them, kept for the next read.

libtiff reads a directory a few bytes at a time and libvips re-reads it several times per open
(../shared/DESIGN-NOTES.md): each block is fetched once however often it is read.
"""

CACHED_BYTES = 32 * 2**20
"""What an open object keeps of what it fetched, least recently read dropped first, beside
what the last prefetch holds: that is kept whole however large (a block's bytes must fit)
until `RangedObject.settle`.

Blocks, and whole longer reads: libtiff reads a TIFF tile in one read, and the tiles of a
batch share the TIFF tiles of their halo, which are then fetched once per batch, not per tile.
"""

GAP_BYTES = 32 * 2**10
"""Prefetched ranges this close are fetched as one: 32 KiB is under half a millisecond of a
function's network, against tens of milliseconds for another request."""

REQUEST_BYTES = 8 * 2**20
"""Ranges are merged up to this size, so a large block is still fetched by several requests
at once (a single range larger than it is fetched alone, whole)."""

REQUESTS_IN_FLIGHT = 8
"""A prefetch's concurrent GETs: under botocore's default pool of 10 connections per client."""

READAHEAD = 8 * 2**20
"""A reader going through the object in order (a JPEG or PNG decoding from the top, a few KB
per read) gets windows that double from a block to this: a request per 8 MiB, not per 64 KiB.
"""

PART_SIZE = 8 * 2**20
"""Multipart parts: S3 wants at least 5 MiB but the last; 10,000 parts then hold 78 GiB."""

PARTS_IN_FLIGHT = 4
"""Parts uploaded while the writer goes on; what the writer holds is bounded by them."""


@contextlib.contextmanager
def storage_errors(key: str) -> Iterator[None]:
    """Turn boto's errors into the project's: throttling, 5xx and network failures retry."""
    try:
        yield
    except ClientError as e:
        raise _translate(e, key) from e
    except BotoCoreError as e:
        # Timeouts, dropped connections and bodies cut short (ReadTimeoutError,
        # ResponseStreamingError, IncompleteReadError) are all worth another attempt.
        raise TransientError(f"storage did not answer for {key}: {type(e).__name__}") from e


class RangedObject:
    """An S3 object read by ranged GetObject: small reads as aligned blocks, or as growing
    windows when they come in order; what was fetched is kept.

    ``requests`` and ``bytes_fetched`` count what was asked of S3.
    """

    def __init__(self, client: S3Client, bucket: str, key: str) -> None:
        self.client = client
        self.bucket = bucket
        self.key = key
        with storage_errors(key):
            self.size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        self.requests = 0
        self.bytes_fetched = 0
        self._kept: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._kept_bytes = 0
        self._pinned: set[tuple[int, int]] = set()
        self._window: tuple[int, bytes] = (0, b"")
        self._next = -1
        self._readahead = BLOCK_SIZE
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``; fewer only at the end of the object."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        kept = self._kept_slice(offset, end)
        if kept is not None:
            with self._lock:
                self._next = end
            return kept
        if end - offset >= BLOCK_SIZE:
            return self._cached(offset, end)
        with self._lock:
            start, window = self._window
            if start <= offset and end <= start + len(window):
                self._next = end
                return window[offset - start : end - start]
            in_order = offset == self._next
            self._next = end
            self._readahead = min(2 * self._readahead, READAHEAD) if in_order else BLOCK_SIZE
            readahead = self._readahead
        if in_order:
            window = self._fetch(offset, min(offset + readahead, self.size))
            with self._lock:
                self._window = (offset, window)
            return window[: end - offset]
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        data = b"".join(
            self._cached(number * BLOCK_SIZE, min((number + 1) * BLOCK_SIZE, self.size))
            for number in range(first, last + 1)
        )
        start = offset - first * BLOCK_SIZE
        return data[start : start + end - offset]

    def prefetch(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Fetch the byte ranges (start, end) that reads will ask for next, merged into few
        requests sent at once, and keep them; ranges already kept are not fetched again."""
        spans = [
            (start, min(end, self.size)) for start, end in ranges if start < min(end, self.size)
        ]
        with self._lock:
            # What the block needs stays kept, however large, until `settle`: the part of it
            # already kept as well as what is fetched now.
            holders = {span: self._holder(*span) for span in spans}
            self._pinned = {holder for holder in holders.values() if holder is not None}
        requests = coalesce(span for span, holder in holders.items() if holder is None)
        if not requests:
            return
        with ThreadPoolExecutor(min(REQUESTS_IN_FLIGHT, len(requests))) as pool:
            bodies = list(pool.map(lambda span: self._fetch(*span), requests))
        with self._lock:
            self._pinned.update(requests)
            for span, body in zip(requests, bodies, strict=True):
                self._keep(span, body)

    def settle(self) -> None:
        """Drop what the last prefetch holds beyond `CACHED_BYTES`, least recently read first.

        Once libvips has decoded a block, its compressed bytes need not stay beside the
        chain's own copies of it: what remains is the cache of before, for the halo tiles the
        next block of a batch shares.
        """
        with self._lock:
            self._pinned = set()
            self._evict()

    @property
    def kept_bytes(self) -> int:
        """Bytes held for the reads to come."""
        return self._kept_bytes

    def _kept_slice(self, start: int, end: int) -> bytes | None:
        """Bytes ``start`` to ``end`` if one kept range holds them all."""
        with self._lock:
            holder = self._holder(start, end)
            if holder is None:
                return None
            low = holder[0]
            return self._kept[holder][start - low : end - low]

    def _holder(self, start: int, end: int) -> tuple[int, int] | None:
        """The kept range that holds ``start`` to ``end``, now the most recently read; called
        with the lock held."""
        for low, high in reversed(self._kept):
            if low <= start and end <= high:
                self._kept.move_to_end((low, high))
                return low, high
        return None

    def _cached(self, start: int, end: int) -> bytes:
        kept = self._kept_slice(start, end)
        if kept is not None:
            return kept
        data = self._fetch(start, end)
        with self._lock:
            self._keep((start, end), data)
        return data

    def _keep(self, span: tuple[int, int], data: bytes) -> None:
        """Keep ``data`` as the most recently read; called with the lock held."""
        if span in self._kept:
            self._kept_bytes -= len(self._kept.pop(span))
        self._kept[span] = data
        self._kept_bytes += len(data)
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently read down to the bound, but for the prefetched block and
        the latest read; called with the lock held."""
        pinned = sum(len(self._kept[span]) for span in self._pinned if span in self._kept)
        for span in list(self._kept)[:-1]:
            if self._kept_bytes <= CACHED_BYTES + pinned:
                return
            if span not in self._pinned:
                self._kept_bytes -= len(self._kept.pop(span))

    def _fetch(self, start: int, end: int) -> bytes:
        with storage_errors(self.key):
            response = self.client.get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}"
            )
            body = response["Body"].read()
        if len(body) != end - start:
            raise TransientError(
                f"storage sent {len(body):,} of {end - start:,} bytes for {self.key}"
            )
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(body)
        return body


class MultipartObject:
    """A write-once S3 object that a seeking writer (libtiff) fills by multipart upload.

    Bytes are uploaded in parts as they fill, while the writer goes on. The first part stays in
    memory to the end, because a TIFF writer goes back to the header to say where its
    directory is. A writer may also skip ahead and fill the gap later (libtiff reserves its
    directory's place, and pads to even offsets, leaving zeros): bytes within a part of a gap
    are held until it is filled. A writer that goes back further fails, never silently.
    """

    def __init__(self, client: S3Client, bucket: str, key: str, content_type: str) -> None:
        self.client = client
        self.bucket = bucket
        self.key = key
        with storage_errors(key):
            self.upload_id = client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType=content_type
            )["UploadId"]
        self.position = 0
        self.size = 0
        self._head = bytearray()
        self._tail = bytearray()
        self._tail_start = PART_SIZE
        self._gaps: list[tuple[int, int]] = []
        self._parts: list[Future[CompletedPartTypeDef]] = []
        self._pool = ThreadPoolExecutor(PARTS_IN_FLIGHT)

    def write(self, data: bytes | memoryview) -> int:
        """Write at the current position; returns the bytes written."""
        start, end = self.position, self.position + len(data)
        if start > self.size:
            self._gaps.append((self.size, start))
        self._gaps = [piece for gap in self._gaps for piece in _minus(gap, start, end)]
        if start < PART_SIZE:
            head_end = min(end, PART_SIZE)
            if head_end > len(self._head):
                self._head.extend(bytes(head_end - len(self._head)))
            self._head[start:head_end] = data[: head_end - start]
        if end > PART_SIZE:
            begin = max(start, PART_SIZE)
            if begin < self._tail_start:
                raise TilefanError(
                    f"the writer of {self.key} went back to byte {begin:,}, already uploaded"
                )
            at = begin - self._tail_start
            if end - self._tail_start > len(self._tail):
                self._tail.extend(bytes(end - self._tail_start - len(self._tail)))
            self._tail[at : at + end - begin] = data[begin - start :]
        self.position = end
        self.size = max(self.size, end)
        self._upload_full_parts()
        return len(data)

    def seek(self, offset: int) -> int:
        """Move the write position; returns it."""
        self.position = offset
        return offset

    def complete(self) -> int:
        """Upload what is held and make the object; returns its size in bytes."""
        if self._tail:
            self._submit(len(self._parts) + 2, bytes(self._tail))
        with storage_errors(self.key):
            parts = [self._upload_part(1, bytes(self._head))]
            parts += [part.result() for part in self._parts]
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )
        self._pool.shutdown()
        return self.size

    def abort(self) -> None:
        """Drop the upload and its parts (the lifecycle rule catches an abort that fails)."""
        self._pool.shutdown(cancel_futures=True)
        with contextlib.suppress(ClientError, BotoCoreError):
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
            )

    def _upload_full_parts(self) -> None:
        # A gap more than a part behind the end is padding that will stay zeros.
        pending = [start for start, _ in self._gaps if start > self.size - PART_SIZE]
        settled = min(pending, default=self.size)
        while settled - self._tail_start >= PART_SIZE and len(self._tail) >= PART_SIZE:
            self._submit(len(self._parts) + 2, bytes(self._tail[:PART_SIZE]))
            del self._tail[:PART_SIZE]
            self._tail_start += PART_SIZE

    def _submit(self, number: int, body: bytes) -> None:
        in_flight = [part for part in self._parts if not part.done()]
        if len(in_flight) >= PARTS_IN_FLIGHT:
            in_flight[0].result()
        for part in self._parts:
            if part.done() and part.exception() is not None:
                part.result()
        self._parts.append(self._pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytes) -> CompletedPartTypeDef:
        with storage_errors(self.key):
            answer = self.client.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
            )
        return {"PartNumber": number, "ETag": answer["ETag"]}


def coalesce(
    ranges: Iterable[tuple[int, int]], gap: int = GAP_BYTES, largest: int = REQUEST_BYTES
) -> list[tuple[int, int]]:
    """Sorted ranges (start, end) merged where at most ``gap`` bytes apart, each merged range
    at most ``largest`` bytes unless one range alone is larger; no range is split."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged:
            low, high = merged[-1]
            if start <= high + gap and max(end, high) - low <= largest:
                merged[-1] = (low, max(end, high))
                continue
            if end <= high:  # inside the last range, which was too large to grow
                continue
        merged.append((start, end))
    return merged


def _minus(gap: tuple[int, int], start: int, end: int) -> list[tuple[int, int]]:
    """What of ``gap`` a write of ``start`` to ``end`` leaves unwritten."""
    low, high = gap
    return [
        piece for piece in ((low, min(high, start)), (max(low, end), high)) if piece[0] < piece[1]
    ]

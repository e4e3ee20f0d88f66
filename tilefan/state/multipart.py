"""An object assembled on S3 from bytes and byte ranges of other objects, by multipart upload.

Ranges of at least 5 MiB are copied server-side (``UploadPartCopy``); smaller pieces are read
and gathered into plain parts, so every part but the last passes S3's 5 MiB minimum and the
assembler never holds more than one part of bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from tilefan.errors import TilefanError
from tilefan.state.storage import TileStore
from tilefan.state.storage import _translate as translate_error

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["MAX_PARTS", "MIN_PART", "Range", "TooManyParts", "assemble_object"]

MIN_PART = 5 * 2**20
"""S3's smallest part, except the last."""
MAX_PARTS = 10_000
_PLAIN_PART = 8 * 2**20
"""A plain part is sent once this many bytes are gathered."""


class TooManyParts(TilefanError):
    """The result would need more than S3's 10,000 multipart parts."""

    code = "TOO_MANY_PARTS"


@dataclass(frozen=True)
class Range:
    """``length`` bytes of object ``key`` from ``start``."""

    key: str
    start: int
    length: int


def assemble_object(
    store: TileStore, key: str, pieces: Iterable[bytes | Range], content_type: str
) -> int:
    """Write ``pieces`` one after the other as object ``key``; returns its size in bytes."""
    client, bucket = store.client, store.bucket
    try:
        upload_id = client.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType=content_type
        )["UploadId"]
    except ClientError as e:
        raise translate_error(e, key) from e
    parts: list[CompletedPartTypeDef] = []
    size = 0
    gathered = bytearray()

    def send(body: bytes) -> None:
        _check_count(parts)
        number = len(parts) + 1
        etag = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})

    def copy(piece: Range) -> None:
        _check_count(parts)
        number = len(parts) + 1
        last = piece.start + piece.length - 1
        etag = client.upload_part_copy(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            CopySource={"Bucket": bucket, "Key": piece.key},
            CopySourceRange=f"bytes={piece.start}-{last}",
        )["CopyPartResult"]["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})

    try:
        for piece in pieces:
            if isinstance(piece, Range):
                size += piece.length
                # Top up a short plain part from the range's head, so the rest can be copied.
                need = max(0, MIN_PART - len(gathered)) if gathered else 0
                if piece.length - need >= MIN_PART:
                    if need:
                        gathered += store.get_range(piece.key, piece.start, need)
                        piece = Range(piece.key, piece.start + need, piece.length - need)
                    if gathered:
                        send(bytes(gathered))
                        gathered.clear()
                    copy(piece)
                    continue
                gathered += store.get_range(piece.key, piece.start, piece.length)
            else:
                size += len(piece)
                gathered += piece
            if len(gathered) >= _PLAIN_PART:
                send(bytes(gathered))
                gathered.clear()
        if gathered or not parts:
            send(bytes(gathered))
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException as e:
        # A failed assembly leaves no parts behind to be billed.
        with contextlib.suppress(ClientError):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        if isinstance(e, ClientError):
            raise translate_error(e, key) from e
        raise
    return size


def _check_count(parts: list[CompletedPartTypeDef]) -> None:
    if len(parts) >= MAX_PARTS:
        raise TooManyParts(
            f"the result needs more than {MAX_PARTS:,} upload parts; use larger tiles"
        )

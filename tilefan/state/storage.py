"""Object storage behind a narrow interface: uploads, intermediate tiles, manifests, results."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import boto3
import pyvips
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from tilefan.errors import TilefanError, TransientError
from tilefan.state._transport import AWS_ERRORS, translate_transport

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

__all__ = ["ObjectMissing", "TileStore", "keys"]

TileStage = Literal["out"]

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)

# Multipart above 8 MiB in 8 MiB parts, 10 at a time (s3transfer's defaults; it grows the
# parts of a file that would need more than 10,000). The embedded engine's server holds a part
# about three times while it passes (the signature check, moto's body, its spooled file), in
# the same process as this client: 64 MiB parts held 1.7 GB for a 1.5 GB upload.
_TRANSFER = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)


READS_IN_FLIGHT = 16
"""Small objects (indexes, groups' documents) `TileStore.get_json_all` reads at once."""


class ObjectMissing(TilefanError):
    """An object the pipeline expected is not in the bucket."""

    code = "OBJECT_MISSING"


class keys:  # noqa: N801 - a namespace of key builders, read as keys.upload(job_id)
    """Where each object of a job lives. Job ids are generated, never taken from users."""

    @staticmethod
    def upload(job_id: str) -> str:
        """The client's upload."""
        return f"uploads/{job_id}/source"

    @staticmethod
    def upload_prefix(job_id: str) -> str:
        """Everything of one job's upload."""
        return f"uploads/{job_id}/"

    @staticmethod
    def job_prefix(job_id: str) -> str:
        """Everything intermediate of one job."""
        return f"jobs/{job_id}/"

    @staticmethod
    def manifest(job_id: str) -> str:
        """The Distributed Map's item list."""
        return f"jobs/{job_id}/manifest.json"

    @staticmethod
    def source(job_id: str) -> str:
        """The tiled TIFF the splitter transcodes an upload into, when the upload is not one."""
        return f"jobs/{job_id}/source.tif"

    @staticmethod
    def tile(job_id: str, stage: TileStage, index: int) -> str:
        """An output tile (made by a worker)."""
        return f"jobs/{job_id}/{stage}/{index:06d}.tif"

    @staticmethod
    def encoded(job_id: str, first_tile: int, part: str, level: int = 0) -> str:
        """A worker's encoded output for the batch starting at ``first_tile``, or at a
        coarser ``level`` the merger's output for its group number ``first_tile``.

        ``part`` is ``tiles`` (the encoded tile bytes), ``index`` (where each tile lies in
        them) or ``pieces`` (raw pixels the merger reduces into coarser levels).
        """
        if level:
            return f"jobs/{job_id}/reduced/{level:02d}/{first_tile:06d}.{part}"
        return f"jobs/{job_id}/encoded/{first_tile:06d}.{part}"

    @staticmethod
    def fanout(job_id: str) -> str:
        """The second fan-out's items: groups of batches whose small levels are joined."""
        return f"jobs/{job_id}/fanout.json"

    @staticmethod
    def encoded_prefix(job_id: str) -> str:
        """Every worker's encoded output of one job."""
        return f"jobs/{job_id}/encoded/"

    @staticmethod
    def statistics_manifest(job_id: str, upto: int) -> str:
        """The item list of the statistics pass over the image before step ``upto``."""
        return f"jobs/{job_id}/statistics/{upto:02d}/manifest.json"

    @staticmethod
    def statistics_part(job_id: str, upto: int, batch: int) -> str:
        """One batch's partial statistics in that pass."""
        return f"jobs/{job_id}/statistics/{upto:02d}/parts/{batch:06d}.npz"

    @staticmethod
    def fanout_failure(job_id: str) -> str:
        """Why a task of the second fan-out failed, for the abort (it has no tile records)."""
        return f"jobs/{job_id}/fanout-failure.json"

    @staticmethod
    def statistics_failure(job_id: str) -> str:
        """Why a statistics pass's tile failed, for the abort (a pass has no tile records)."""
        return f"jobs/{job_id}/statistics/failure.json"

    @staticmethod
    def statistics(job_id: str, upto: int) -> str:
        """The combined statistics of the image before step ``upto``."""
        return f"jobs/{job_id}/statistics/{upto:02d}/combined.npz"

    @staticmethod
    def result(job_id: str, extension: str) -> str:
        """The assembled output."""
        return f"results/{job_id}/result.{extension}"

    @staticmethod
    def result_prefix(job_id: str) -> str:
        """Everything of one job's output."""
        return f"results/{job_id}/"


def _translate(error: ClientError | BotoCoreError, key: str) -> TilefanError:
    if isinstance(error, BotoCoreError):
        return translate_transport(error, f"storage, for {key},")
    return _refusal(error.response.get("Error", {}).get("Code", ""), key)


def _refusal(code: str, key: str) -> TilefanError:
    if code in ("NoSuchKey", "404", "NotFound"):
        return ObjectMissing(f"{key} is not in the bucket")
    if code in _TRANSIENT_CODES:
        return TransientError(f"storage was busy ({code}) for {key}")
    return TilefanError(f"storage refused {key}: {code}")


class TileStore:
    """S3 access for one bucket: tiles as lossless TIFF, JSON documents, whole files."""

    def __init__(
        self, bucket: str, *, client: S3Client | None = None, compression: str = "none"
    ) -> None:
        self.bucket = bucket
        self.client: S3Client = client or boto3.client("s3")
        self.compression = compression

    def put_tile(
        self,
        job_id: str,
        stage: TileStage,
        index: int,
        tile: pyvips.Image,
        *,
        metadata: bool = True,
    ) -> int:
        """Store a tile losslessly (any band count and pixel format); returns its size in bytes.

        With ``metadata=False`` only the pixels are kept: no ICC profile, EXIF or XMP, which an
        input can make megabytes long and every tile would otherwise carry.
        """
        options = {} if metadata else {"keep": "none"}
        body = tile.tiffsave_buffer(compression=self.compression, predictor="none", **options)
        self._put(keys.tile(job_id, stage, index), body)
        return len(body)

    def get_tile(
        self, job_id: str, stage: TileStage, index: int, interpretation: str
    ) -> pyvips.Image:
        """A stored tile, decoded into memory, with the interpretation TIFF cannot carry."""
        body = self._get(keys.tile(job_id, stage, index))
        tile = pyvips.Image.new_from_buffer(body, "", access="sequential")
        return tile.copy(interpretation=interpretation).copy_memory()

    def put_bytes(
        self, key: str, body: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        """Store an object as it is."""
        self._put(key, body, content_type)

    def get_bytes(self, key: str) -> bytes:
        """Read an object as it is."""
        return self._get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of an object, from byte ``start``."""
        return self._get(key, f"bytes={start}-{start + length - 1}")

    def put_json(self, key: str, document: Any) -> None:
        """Store a JSON document."""
        self._put(key, json.dumps(document, separators=(",", ":")).encode())

    def get_json(self, key: str) -> Any:
        """Read a JSON document."""
        return json.loads(self._get(key))

    def get_json_all(self, names: Iterable[str]) -> list[Any]:
        """Read JSON documents, `READS_IN_FLIGHT` at a time: each is a request's latency,
        and a stage reads one per batch or group."""
        with ThreadPoolExecutor(READS_IN_FLIGHT) as pool:
            return list(pool.map(self.get_json, names))

    def download(self, key: str, path: Path) -> None:
        """Copy an object to a local file, in parallel parts for large objects."""
        try:
            self.client.download_file(self.bucket, key, str(path), Config=_TRANSFER)
        except AWS_ERRORS as e:
            raise _translate(e, key) from e
        except RetriesExceededError as e:
            raise TransientError(f"storage did not answer for {key}") from e

    def upload(self, path: Path, key: str, content_type: str) -> None:
        """Copy a local file to an object, multipart above 8 MiB."""
        try:
            self.client.upload_file(
                str(path),
                self.bucket,
                key,
                Config=_TRANSFER,
                ExtraArgs={"ContentType": content_type},
            )
        except AWS_ERRORS as e:
            raise _translate(e, key) from e
        except S3UploadFailedError as e:
            # boto3 turns the transfer's error into this, keeping it only as the context;
            # without the translation a throttled or dropped upload would not be retried.
            if isinstance(e.__context__, AWS_ERRORS):
                raise _translate(e.__context__, key) from e
            raise TilefanError(f"storage refused {key}") from e

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when it does not exist."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except AWS_ERRORS as e:
            if isinstance(_translate(e, key), ObjectMissing):
                return None
            raise _translate(e, key) from e

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many went."""
        deleted = 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                batch: list[ObjectIdentifierTypeDef] = [
                    {"Key": item["Key"]} for item in page.get("Contents", [])
                ]
                if batch:
                    answer = self.client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                    )
                    _raise_first_refusal(answer.get("Errors", []))
                    deleted += len(batch)
        except AWS_ERRORS as e:
            raise _translate(e, prefix) from e
        return deleted

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            return [
                item["Key"]
                for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                for item in page.get("Contents", [])
            ]
        except AWS_ERRORS as e:
            raise _translate(e, prefix) from e

    def _put(self, key: str, body: bytes, content_type: str = "binary/octet-stream") -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except AWS_ERRORS as e:
            raise _translate(e, key) from e

    def _get(self, key: str, byte_range: str | None = None) -> bytes:
        # Reading the body is inside: a connection dropped mid-body or a body shorter than its
        # Content-Length raises here, not in get_object.
        try:
            if byte_range:
                response = self.client.get_object(Bucket=self.bucket, Key=key, Range=byte_range)
            else:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read()
        except AWS_ERRORS as e:
            raise _translate(e, key) from e


def _raise_first_refusal(errors: Sequence[Mapping[str, Any]]) -> None:
    """DeleteObjects answers 200 and lists the keys it did not delete; any one is a failure."""
    if errors:
        first = errors[0]
        raise _refusal(str(first.get("Code", "")), f"{first.get('Key', '')} (of {len(errors)})")

"""Request and response documents of the REST API (pydantic, so they also make its OpenAPI)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tilefan.formats.dz_tiles import IIIF_ID_PATTERN
from tilefan.formats.outputs import OutputFormat
from tilefan.imaging.operations import Step
from tilefan.imaging.plan import MAX_TILE_SIZE, MIN_TILE_SIZE
from tilefan.state.jobs import Job, JobStatus, TileProgress, TileRecord, TileState

__all__ = [
    "CompleteUploadRequest",
    "CreateJobRequest",
    "DeletedJob",
    "ErrorBody",
    "JobCreated",
    "JobDocument",
    "JobPage",
    "MultipartUpload",
    "ResultLink",
    "SignPartsRequest",
    "SignedParts",
    "SingleUpload",
    "TilePage",
    "UploadPart",
    "job_document",
    "tile_document",
]


_HEADER_VALUE = re.compile(r"[!-~][ -~]*")
"""A header value without control characters: visible ASCII, spaces inside."""


class _Strict(BaseModel):
    """A request document: unknown fields refused, and no coercion (``"256"`` is not a number),
    the same policy as the operations' own fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


class OutputSpec(_Strict):
    """What to produce: a format and its options."""

    format: OutputFormat = "tiff"
    compression: Literal["deflate", "lzw", "none", "jpeg"] | None = Field(
        default=None, description="tiff only; lossless deflate by default"
    )
    pyramid: bool = Field(
        default=False, description="tiff only: every reduced level, laid out as a COG"
    )
    quality: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="jpeg, webp, tiff with jpeg compression, and jpeg or webp tiles of a tile set",
    )
    lossless: bool = Field(default=False, description="webp only")
    tile_size: int | None = Field(
        default=None,
        ge=2,
        le=8192,
        description="dz, dzi and iiif: the tiles' edge, even (dzsave's 254 for DeepZoom, 512 "
        "for IIIF)",
    )
    overlap: int | None = Field(
        default=None,
        ge=0,
        le=4096,
        description="dz and dzi: pixels each tile takes from its neighbours (1 by default)",
    )
    suffix: Literal["jpeg", "png", "webp"] | None = Field(
        default=None, description="dz, dzi and iiif: the tiles' encoding (jpeg by default)"
    )
    iiif_id: str | None = Field(
        default=None,
        max_length=1000,
        pattern=IIIF_ID_PATTERN,
        description="iiif: the URL the set is served from, without its last part (result); "
        "info.json's id is this followed by /result (dzsave's https://example.com/iiif by "
        "default)",
    )
    preview: bool = Field(
        default=True,
        description="tiff, jpeg, png and webp: also write a DeepZoom preview (256-pixel JPEG "
        "tiles) under results/<job>/preview/, which the job page shows; 8-bit results only. "
        "With it, a jpeg, png or webp job's tile_size is rounded to 256 times a power of two",
    )

    def options(self) -> dict[str, Any]:
        """The options the merger passes to the saver."""
        return self.model_dump(exclude={"format"}, exclude_none=True)


class InputSpec(_Strict):
    """What the client will upload."""

    size_bytes: int = Field(gt=0, description="exact size of the upload in bytes")
    content_type: str = Field(
        default="application/octet-stream",
        max_length=200,
        description="a media type on one line of printable ASCII, sent back as a header",
        json_schema_extra={"pattern": f"^{_HEADER_VALUE.pattern}$"},
    )
    width: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="the image's width in pixels, if known: with height, a result that "
        "cannot be made is refused now (OUTPUT_TOO_LARGE), not after the upload",
    )
    height: int | None = Field(default=None, ge=1, le=10_000_000, description="with width")

    @field_validator("content_type")
    @classmethod
    def _one_header_line(cls, value: str) -> str:
        # It becomes the upload's Content-Type header: a CR or LF would start another header.
        if not _HEADER_VALUE.fullmatch(value):
            raise ValueError("must be a media type such as image/png, printable ASCII on one line")
        return value


class CreateJobRequest(_Strict):
    """Body of `POST /jobs`."""

    operations: list[Step] = Field(min_length=0, max_length=32)
    output: OutputSpec = Field(default_factory=OutputSpec)
    tile_size: int | None = Field(default=None, ge=MIN_TILE_SIZE, le=MAX_TILE_SIZE)
    input: InputSpec


class SingleUpload(BaseModel):
    """Upload the whole file with one presigned PUT."""

    method: Literal["PUT"] = "PUT"
    url: str
    headers: dict[str, str]
    expires_at: str


class UploadPart(BaseModel):
    """One part of a multipart upload: PUT bytes ``[(n-1)*part_size, n*part_size)``."""

    part_number: int
    url: str


class MultipartUpload(BaseModel):
    """Upload in parts with presigned PUTs, then POST the parts' ETags to ``complete_url``.

    ``parts`` holds the first parts' URLs; POST part numbers to ``parts_url`` for the others (or
    for fresh ones), shortly before uploading them: each URL expires ``expires_at``.
    """

    part_size: int
    part_count: int
    parts: list[UploadPart]
    parts_url: str
    complete_url: str
    expires_at: str


class SignPartsRequest(_Strict):
    """Body of `POST /jobs/{job_id}/upload/parts`."""

    part_numbers: list[int] = Field(min_length=1, max_length=100)


class SignedParts(BaseModel):
    """Answer to `POST /jobs/{job_id}/upload/parts`: fresh part URLs and when they expire."""

    parts: list[UploadPart]
    expires_at: str


class Links(BaseModel):
    """Where to go next."""

    self: str
    start: str
    tiles: str
    progress_svg: str
    result: str
    view: str | None = Field(
        default=None,
        description="the job's page in a browser; the link is its own credential, and expires",
    )


class JobCreated(BaseModel):
    """Answer to `POST /jobs`."""

    job_id: str
    status: JobStatus
    upload: SingleUpload | None = None
    multipart: MultipartUpload | None = None
    links: Links


class CompletedPart(_Strict):
    """A part the client uploaded, with the ETag its PUT returned."""

    part_number: int = Field(ge=1, le=10_000)
    etag: str = Field(min_length=1, max_length=200)


class CompleteUploadRequest(_Strict):
    """Body of `POST /jobs/{job_id}/upload/complete`."""

    parts: list[CompletedPart] = Field(min_length=1, max_length=10_000)


class TileSummary(BaseModel):
    """Per-tile progress: counts by state and every tile's state as rows of letters."""

    total: int
    done: int
    failed: int
    running: int
    pending: int
    rows: int
    columns: int
    output_pixels: int = Field(description="pixels of the result, over all tiles")
    grid: list[str] = Field(
        description="one string per tile row; P pending, R running, D done, F failed"
    )


class PassSummary(BaseModel):
    """One statistics pass's progress: its tiles cover the image before a whole-image step."""

    before_step: int = Field(
        description="the chain step whose statistics the pass gathers; the chain's length "
        "for a stats output"
    )
    total: int
    done: int
    pending: int
    rows: int
    columns: int
    pixels: int = Field(description="pixels the pass reads, over all its tiles")
    grid: list[str] = Field(description="one string per tile row; P pending, D done")


class JobDocument(BaseModel):
    """Answer to `GET /jobs/{job_id}`."""

    job_id: str
    status: JobStatus
    stage: Literal["waiting", "split", "stats", "process", "merge", "done"]
    created_at: str
    updated_at: str
    operations: list[dict[str, Any]]
    output_format: str
    tile_size: int
    timings: dict[str, float]
    error: dict[str, str] | None = None
    output: dict[str, Any] | None = None
    tiles: TileSummary | None = None
    statistics: list[PassSummary] = Field(
        default_factory=list,
        description="the statistics passes, in order, for a chain with whole-image steps or a "
        "stats output; their tiles are done while the stage is stats",
    )
    links: Links


class JobPage(BaseModel):
    """Answer to `GET /jobs`: newest first."""

    jobs: list[JobDocument]
    next_cursor: str | None = None


class TileDocument(BaseModel):
    """One tile's detail."""

    index: int
    row: int
    column: int
    state: TileState
    attempts: int
    duration_ms: int | None = None
    error: str | None = None


class TilePage(BaseModel):
    """Answer to `GET /jobs/{job_id}/tiles`."""

    tiles: list[TileDocument]
    next_cursor: str | None = None


class ResultLink(BaseModel):
    """A short-lived download URL for the result."""

    url: str
    expires_at: str


class DeletedJob(BaseModel):
    """Answer to deleting an ended job: it and its objects are gone."""

    job_id: str
    deleted: Literal[True] = True


class ErrorBody(BaseModel):
    """Every error: a stable code and a sentence, never a stack trace."""

    code: str
    message: str
    field: str | None = None


_STAGES = {
    JobStatus.CREATED: "waiting",
    JobStatus.QUEUED: "waiting",
    JobStatus.SPLITTING: "split",
    JobStatus.STATISTICS: "stats",
    JobStatus.PROCESSING: "process",
    JobStatus.MERGING: "merge",
}


def links(base: str, job_id: str, *, view_token: str | None = None) -> Links:
    """The job's routes under ``base``; with a page token, the job page's link too."""
    root = f"{base}/jobs/{job_id}"
    return Links(
        self=root,
        start=f"{root}/start",
        tiles=f"{root}/tiles",
        progress_svg=f"{root}/progress.svg",
        result=f"{root}/result",
        view=f"{root}/view?{urlencode({'token': view_token})}" if view_token else None,
    )


def job_document(
    job: Job,
    progress: TileProgress | None,
    base: str,
    *,
    view_token: str | None = None,
    passes: Mapping[int, TileProgress] | None = None,
) -> JobDocument:
    """The status document of a job; ``passes``: each statistics pass's progress, by ``upto``."""
    tiles = None
    if progress is not None and job.grid:
        columns = int(job.grid["columns"])
        tiles = TileSummary(
            total=progress.total,
            done=progress.done,
            failed=progress.failed,
            running=progress.counts.get(TileState.RUNNING, 0),
            pending=progress.counts.get(TileState.PENDING, 0),
            rows=int(job.grid["rows"]),
            columns=columns,
            output_pixels=int(job.grid["output_width"]) * int(job.grid["output_height"]),
            grid=[progress.grid[i : i + columns] for i in range(0, len(progress.grid), columns)],
        )
    return JobDocument(
        job_id=job.job_id,
        status=job.status,
        stage=_STAGES.get(job.status, "done"),  # type: ignore[arg-type]
        created_at=job.created_at,
        updated_at=job.updated_at,
        operations=job.operations,
        output_format=job.output_format,
        tile_size=job.tile_size,
        timings=job.timings,
        error=job.error,
        output=job.output,
        tiles=tiles,
        statistics=_pass_summaries(job, passes or {}),
        links=links(base, job.job_id, view_token=view_token),
    )


def _pass_summaries(job: Job, passes: Mapping[int, TileProgress]) -> list[PassSummary]:
    summaries = []
    for grid in (job.grid or {}).get("passes", []):
        progress = passes.get(int(grid["upto"]))
        if progress is None:
            continue
        columns = int(grid["columns"])
        summaries.append(
            PassSummary(
                before_step=int(grid["upto"]),
                total=progress.total,
                done=progress.done,
                pending=progress.counts.get(TileState.PENDING, 0),
                rows=int(grid["rows"]),
                columns=columns,
                pixels=int(grid["width"]) * int(grid["height"]),
                grid=[
                    progress.grid[i : i + columns] for i in range(0, len(progress.grid), columns)
                ],
            )
        )
    return summaries


def tile_document(record: TileRecord, columns: int) -> TileDocument:
    """One tile's detail document."""
    row, column = divmod(record.index, columns)
    return TileDocument(
        index=record.index,
        row=row,
        column=column,
        state=record.state,
        attempts=record.attempts,
        duration_ms=record.duration_ms,
        error=record.error,
    )

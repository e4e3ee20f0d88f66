"""Typed configuration, read once from the environment; an explicit argument beats it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tilefan.imaging.plan import MAX_TILE_SIZE, MIN_TILE_SIZE

__all__ = ["Settings", "TileEncoding"]

TileEncoding = Literal["none", "deflate", "lzw"]


class Settings(BaseSettings):
    """Everything the handlers and the engine read from `TILEFAN_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TILEFAN_", frozen=True)

    bucket: str = ""
    """The S3 bucket for uploads, intermediate tiles and results (`TILEFAN_BUCKET`)."""
    table: str = ""
    """The DynamoDB table of jobs and tiles (`TILEFAN_TABLE`)."""
    state_machine_arn: str = ""
    """The pipeline's state machine (`TILEFAN_STATE_MACHINE_ARN`), used by the API."""
    cleanup_function: str = ""
    """The function that removes a cancelled or deleted job's objects and tile items
    (`TILEFAN_CLEANUP_FUNCTION`), invoked asynchronously by the API."""
    max_pixels: int = Field(default=2_500_000_000, ge=1)
    """Refuse inputs whose header declares more pixels than this."""
    max_pixels_per_byte: float = Field(default=20_000, gt=0)
    """Refuse inputs that declare this many pixels per byte of file: a decompression bomb."""
    tile_size: int = Field(default=1024, ge=MIN_TILE_SIZE, le=MAX_TILE_SIZE)
    """Default tile edge in source pixels."""
    worker_memory_mb: int = Field(default=2048, ge=128, le=10240)
    """The tile worker's memory (`TileWorkerMemorySize`): bounds the tile size per pixel format."""
    tiles_per_item: int = Field(default=4, ge=1, le=1000)
    """Tiles per Distributed Map item: fewer items, less orchestration per tile."""
    tile_encoding: TileEncoding = "none"
    """TIFF compression of intermediate tiles: bytes moved against CPU spent."""
    merger_timeout: int = Field(default=900, ge=1, le=900)
    """The merger function's timeout in seconds (template.yaml): results too slow to encode
    in it are refused before the job runs (`tilefan.formats.output_limits`)."""
    merger_memory_mb: int = Field(default=3008, ge=128, le=10_240)
    """The merger function's memory (template.yaml): webp results it cannot hold are refused."""
    job_ttl_days: int = Field(default=30, ge=1)
    """Jobs and their records expire this many days after creation."""
    max_input_bytes: int = Field(default=50 * 2**30, ge=1)
    """Largest upload a job may declare."""
    multipart_threshold: int = Field(default=100 * 2**20, ge=5 * 2**20, le=5 * 2**30)
    """Uploads larger than this get presigned multipart part URLs instead of one PUT."""
    multipart_part_size: int = Field(default=64 * 2**20, ge=5 * 2**20, le=5 * 2**30)
    """Smallest multipart part: 64 MiB keeps even a 50 GiB upload under 1,000 part URLs."""
    tile_worker_concurrency: int = Field(default=100, ge=1, le=10_000)
    """The tile worker's reserved concurrency: the most a job's max_concurrency may be."""
    cors_allowed_origins: str = "*"
    """Comma-separated origins whose web pages may call the API; ``*`` for any."""
    presign_seconds: int = Field(default=900, ge=60, le=43_200)
    """How long presigned upload and download URLs stay valid."""
    view_secret: str = Field(default="", repr=False)
    """Signs job page links (`TILEFAN_VIEW_SECRET`); empty: jobs have no page link."""
    view_link_seconds: int = Field(default=7 * 86_400, ge=60, le=30 * 86_400)
    """How long a job page link opens the page."""

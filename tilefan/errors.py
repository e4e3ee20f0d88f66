"""Named errors: each carries a stable code that the API, the CLI and the state machine use."""

from __future__ import annotations

__all__ = [
    "DamagedImage",
    "InvalidChain",
    "InvalidTileSize",
    "JobNotFound",
    "OutputTooLarge",
    "TileFailed",
    "TileTooLarge",
    "TilefanError",
    "TooManyPixels",
    "TransientError",
    "UnsupportedImage",
    "reason",
]


class TilefanError(Exception):
    """Base of the errors tilefan raises on purpose: a stable `code`, a message for people."""

    code = "INTERNAL_ERROR"


class InvalidChain(TilefanError):
    """The operation chain does not validate; the message names the step index and field."""

    code = "INVALID_CHAIN"


class InvalidTileSize(TilefanError):
    """The tile size is outside the supported range."""

    code = "INVALID_TILE_SIZE"


class TileTooLarge(InvalidTileSize):
    """A tile's source block would not fit the tile worker's memory, for this pixel format."""

    code = "TILE_TOO_LARGE"


class UnsupportedImage(TilefanError):
    """The input is not an image format or pixel layout tilefan can process."""

    code = "UNSUPPORTED_FORMAT"


class DamagedImage(TilefanError):
    """The input claims a supported format but cannot be decoded."""

    code = "DAMAGED_IMAGE"


class TooManyPixels(TilefanError):
    """The header declares more pixels than the configured limit (a decompression bomb guard)."""

    code = "TOO_MANY_PIXELS"


class OutputTooLarge(TilefanError):
    """The result cannot be made in the requested format: too wide for it, or too slow to encode."""

    code = "OUTPUT_TOO_LARGE"


class TileFailed(TilefanError):
    """A tile could not be processed; retrying will not help."""

    code = "TILE_FAILED"


class TransientError(TilefanError):
    """A failure worth retrying (throttling, a storage hiccup); the state machine retries it."""

    code = "TRANSIENT"


class JobNotFound(TilefanError):
    """No such job, or it belongs to another caller."""

    code = "JOB_NOT_FOUND"


def reason(error: BaseException) -> str:
    """An error's most specific line: for a libvips error, the last line of its detail.

    pyvips puts libvips' sentence first and its indented error log after it, most specific
    last.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__

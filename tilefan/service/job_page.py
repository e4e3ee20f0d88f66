"""The job page: signed view links, and the page's own files (HTML, CSS, script, viewer)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from tilefan.formats.dz_tiles import TileSetLayout
from tilefan.stages.tileset_output import PREVIEW_LAYOUT
from tilefan.state.jobs import Job

__all__ = ["PAGE_FILES", "ViewLinks", "ViewedSet", "page_file"]

PAGE_FILES: dict[str, str] = {
    "job.html": "text/html; charset=utf-8",
    "job.css": "text/css; charset=utf-8",
    "job.js": "text/javascript; charset=utf-8",
    "openseadragon.min.js": "text/javascript; charset=utf-8",
    "openseadragon-LICENSE.txt": "text/plain; charset=utf-8",
}
"""Every file the page loads, by name, with its content type: nothing else is served."""


_ROUND_S = 3600
"""Expiries are whole hours."""


@dataclass(frozen=True)
class ViewLinks:
    """Signs and checks the token of a job page link.

    A browser cannot send the API key on navigation, so the link carries its credential: an
    expiry and an HMAC over job id, owner and expiry with the deployment's secret. Nothing else
    is in the token, so it names no owner, and a token for one job opens no other.
    """

    secret: bytes
    lifetime_s: int

    def token(self, job_id: str, owner: str, *, now: float | None = None) -> str:
        """A token that opens ``job_id``'s page for ``lifetime_s`` from now, at least.

        The expiry is rounded up to the next whole hour, so the job document (which carries
        the link) reads the same from one poll to the next.
        """
        at_least = (time.time() if now is None else now) + self.lifetime_s
        expires = int(-(-at_least // _ROUND_S) * _ROUND_S)
        return f"{expires}.{self._mac(job_id, owner, expires)}"

    def opens(self, token: str, job_id: str, owner: str, *, now: float | None = None) -> bool:
        """Whether ``token`` was signed for this job and owner and has not expired."""
        expires_text, _, mac = token.partition(".")
        if not expires_text.isdigit() or len(expires_text) > 12:
            return False
        expires = int(expires_text)
        if expires < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(mac, self._mac(job_id, owner, expires))

    def _mac(self, job_id: str, owner: str, expires: int) -> str:
        message = f"{job_id}\n{owner}\n{expires}".encode()
        digest = hmac.new(self.secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def page_file(name: str) -> tuple[str, str] | None:
    """The content type and text of one of the page's files, or None for any other name."""
    content_type = PAGE_FILES.get(name)
    if content_type is None:
        return None
    text = resources.files("tilefan.service").joinpath("page", name).read_text(encoding="utf-8")
    return content_type, text


@dataclass(frozen=True)
class ViewedSet:
    """A job's DeepZoom or IIIF tile set as the page's viewer reads it, through the API.

    The viewer numbers levels as DeepZoom does (0 is one pixel, each next one twice the size)
    and names a tile by level, column and row; the API maps that to the tile's key under the
    set's prefix, so a request can name no other object.
    """

    layout: TileSetLayout
    prefix: str
    width: int
    height: int

    @classmethod
    def of(cls, job: Job) -> ViewedSet | None:
        """The set a succeeded job's page shows: its result's, its preview, or None."""
        output = job.output or {}
        if "preview" in output:
            layout, prefix = PREVIEW_LAYOUT, output["preview"]["prefix"]
        elif job.output_format in ("dzi", "iiif") and "prefix" in output:
            layout = TileSetLayout.from_options(job.output_format, job.output_options)
            prefix = output["prefix"]
        else:
            return None
        return cls(layout, str(prefix), int(output["width"]), int(output["height"]))

    @property
    def max_level(self) -> int:
        """The viewer's number of the full-resolution level."""
        return math.ceil(math.log2(max(self.width, self.height, 1)))

    def viewer_source(self) -> dict[str, Any]:
        """What the page's OpenSeadragon tile source is built from."""
        levels = len(self.layout.level_sizes(self.width, self.height))
        return {
            "width": self.width,
            "height": self.height,
            "tile_size": self.layout.tile_size,
            "overlap": self.layout.overlap,
            "min_level": self.max_level - levels + 1,
            "max_level": self.max_level,
        }

    def tile_key(self, level: int, column: int, row: int) -> str | None:
        """The key of the viewer's tile (level, column, row), or None where the set has none."""
        sizes = self.layout.level_sizes(self.width, self.height)
        index = self.max_level - level
        if not 0 <= index < len(sizes):
            return None
        width, height = sizes[index]
        size = self.layout.tile_size
        if not (0 <= column < -(-width // size) and 0 <= row < -(-height // size)):
            return None
        return self.prefix + self.layout.tile_name(sizes, index, column, row)

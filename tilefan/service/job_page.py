"""The job page: signed view links, and the page's own files (HTML, CSS, script, viewer)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from importlib import resources

__all__ = ["PAGE_FILES", "ViewLinks", "page_file"]

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

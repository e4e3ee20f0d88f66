"""The engine most integration modules run their jobs on: one per module, in process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tilefan.local.stack import LocalStack, local_stack


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    """The embedded engine and the job service over it, functions as threads."""
    with local_stack() as running:
        yield running

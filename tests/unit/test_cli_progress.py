"""The CLI's progress bar follows the statistics pass under way, then the processing tiles."""

from __future__ import annotations

import io
from typing import Any

import pytest

from tilefan.cli import _Progress

pytestmark = pytest.mark.unit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def document(status: str, passes: list[tuple[int, int]], done: int) -> dict[str, Any]:
    return {
        "status": status,
        "links": {},
        "statistics": [{"done": d, "total": t} for d, t in passes],
        "tiles": {"done": done, "total": 48},
    }


def test_the_bar_counts_the_pass_under_way_then_the_tiles() -> None:
    terminal = Terminal()
    bar = _Progress(terminal)
    bar.on_document(document("STATISTICS", [(20, 20), (7, 20)], 0))
    assert "] 7/20 tiles" in terminal.getvalue()
    bar.on_document(document("PROCESSING", [(20, 20), (20, 20)], 5))
    assert terminal.getvalue().rsplit("\r", 1)[-1].split("]")[1].startswith(" 5/48 tiles")

"""Each invocation starts with the scratch space that earlier, killed invocations filled emptied."""

from __future__ import annotations

from pathlib import Path

import pytest

import tilefan.stages.scratch
from tilefan.stages.scratch import invocation_scratch

pytestmark = pytest.mark.unit


def killed_invocation(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Scratch taken by an invocation that never reached its cleanup, in a process now gone."""
    taken = invocation_scratch(root)
    path = taken.__enter__()  # never exited: Lambda killed the invocation
    (path / "source.v").write_bytes(b"\0" * 4096)
    # Lambda restarts the runtime after a timeout or out-of-memory; /tmp stays.
    monkeypatch.setattr(tilefan.stages.scratch, "_in_use", set())
    return path


def test_what_a_killed_invocation_left_is_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leftover = killed_invocation(tmp_path, monkeypatch)
    unrelated = tmp_path / "not-ours.txt"
    unrelated.write_text("kept")
    with invocation_scratch(tmp_path) as scratch:
        assert not leftover.exists()
        assert scratch.is_dir() and list(scratch.iterdir()) == []
    assert not scratch.exists()
    assert unrelated.read_text() == "kept"


def test_scratch_of_another_live_process_is_kept(tmp_path: Path) -> None:
    # Tests and local runs share the machine's /tmp; Lambda gives each environment its own.
    import os
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        theirs = tmp_path / f"tilefan-scratch-{other.pid}-abc"
        theirs.mkdir()
        gone = tmp_path / "tilefan-scratch-999999999-abc"  # no such process
        gone.mkdir()
        with invocation_scratch(tmp_path) as mine:
            assert mine.name.startswith(f"tilefan-scratch-{os.getpid()}-")
        assert theirs.exists() and not gone.exists()
    finally:
        other.kill()
        other.wait()


def test_scratch_of_an_invocation_still_running_in_this_process_is_kept(tmp_path: Path) -> None:
    # The embedded engine runs several invocations in one process, sharing one /tmp.
    with invocation_scratch(tmp_path) as running:
        (running / "cell.v").write_bytes(b"\0")
        with invocation_scratch(tmp_path) as other:
            assert (running / "cell.v").exists()
            assert other != running
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["merge"])  # the splitter reads by range: no disk
def test_the_stages_that_use_disk_take_their_scratch_here(stage: str) -> None:
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(f"tilefan.stages.{stage}"))
    assert "invocation_scratch(pipeline.settings.scratch_dir)" in source
    assert "tempfile" not in source

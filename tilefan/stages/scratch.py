"""Scratch space for one invocation, cleared of what earlier, killed invocations left.

A Lambda invocation that times out or runs out of memory never reaches its cleanup, and the
next invocation in the same warm environment finds the files in /tmp: a few of those fill
ephemeral storage. Every stage takes its scratch directory here, which first removes the
directories that no running invocation is using: none of this process's, and none of another
live process (the embedded engine and the tests share a machine's /tmp; on Lambda a killed
invocation's runtime is restarted, so its process is gone, or is this one). A write that finds
the space full raises `OutOfDisk`, whatever was writing: the input is not at fault.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyvips

from tilefan.errors import OutOfDisk, is_out_of_disk, reason

__all__ = ["invocation_scratch"]

_PREFIX = "tilefan-scratch-"
_in_use: set[Path] = set()
"""Directories of invocations running in this process: one on Lambda, several in the engine."""
_lock = threading.Lock()


@contextmanager
def invocation_scratch(root: str | Path) -> Iterator[Path]:
    """A fresh directory under ``root``, removed on exit; leftovers under ``root`` go first."""
    base = Path(root)
    with _lock:
        for leftover in base.glob(f"{_PREFIX}*"):
            if leftover not in _in_use and not _owner_alive(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base))
        _in_use.add(path)
    try:
        yield path
    except (OSError, pyvips.Error) as e:
        if is_out_of_disk(e):
            raise OutOfDisk(f"the scratch space is full: {reason(e)}") from e
        raise
    finally:
        with _lock:
            _in_use.discard(path)
        shutil.rmtree(path, ignore_errors=True)


def _owner_alive(directory: Path) -> bool:
    """Whether another process that is still running made ``directory``."""
    owner = directory.name.removeprefix(_PREFIX).split("-", 1)[0]
    if not owner.isdigit() or int(owner) == os.getpid():
        return False
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True

"""Running a measurement in a child process and reading back its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "emit_row", "run_child", "write_result"]

ROOT = Path(__file__).resolve().parent.parent


def run_child(
    module: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    stdin: str | None = None,
) -> dict[str, Any]:
    """Run ``python -m module args... --result FILE`` and return what it wrote to FILE.

    ``stdin``, when given, is the child's standard input. A child that fails returns
    ``{"error": ...}`` with the tail of its stderr, so one failed case is recorded and the
    sweep goes on.
    """
    with tempfile.TemporaryDirectory(prefix="tilefan-bench-") as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, "-m", module, *args, "--result", str(result_file)]
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), child_env.get("PYTHONPATH", "")])
        )
        try:
            completed = subprocess.run(
                command,
                input=stdin,
                cwd=ROOT,
                env=child_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"{module} timed out after {timeout} s"}
        if completed.returncode != 0 or not result_file.exists():
            tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
            return {"error": f"{module} exited {completed.returncode}: {tail}"}
        result: dict[str, Any] = json.loads(result_file.read_text())
        return result


def write_result(path: str, result: Mapping[str, Any]) -> None:
    """What a child does last: its result, as JSON, where the parent asked."""
    Path(path).write_text(json.dumps(result, indent=1, default=str))


def emit_row(row: Mapping[str, Any], out: Path | None) -> None:
    """Print one measurement as a JSON line, and append it to ``out`` when given."""
    print(json.dumps(row), flush=True)
    if out is not None:
        with out.open("a", encoding="utf-8") as lines:
            lines.write(json.dumps(row) + "\n")

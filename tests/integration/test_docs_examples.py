"""The documentation's examples, run as written: a block marked runnable must work for a reader.

A fenced ``python`` or ``sh`` block in README.md or docs/*.md whose previous line is an HTML
comment starting ``<!-- runnable`` is run here, in an empty folder holding what a reader of the
README has: a ``scan.tif`` and the console script at ``.venv/bin/tilefan``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pyvips

from tests.support import REPOSITORY_IMAGES
from tilefan.cli import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_RUNNABLE = re.compile(r"<!-- runnable[^\n]*-->\n```(python|sh)\n(.*?)\n```", re.DOTALL)


def _runnable_blocks() -> list[Any]:
    blocks = []
    for document in DOCUMENTS:
        for number, found in enumerate(_RUNNABLE.finditer(document.read_text()), start=1):
            language, code = found.groups()
            blocks.append(pytest.param(language, code, id=f"{document.name}-{number}-{language}"))
    return blocks


BLOCKS = _runnable_blocks()


def test_the_readme_and_the_engine_doc_mark_their_examples_runnable() -> None:
    marked = {block.id.split("-")[0] for block in BLOCKS}
    assert {"README.md", "engine.md"} <= marked, marked


@pytest.mark.parametrize(("language", "code"), BLOCKS)
def test_a_runnable_block_runs_as_written(language: str, code: str, tmp_path: Path) -> None:
    photo = pyvips.Image.new_from_file(str(REPOSITORY_IMAGES / "rocket.jpg"))
    photo.tiffsave(str(tmp_path / "scan.tif"))
    scripts = tmp_path / ".venv" / "bin"
    scripts.mkdir(parents=True)
    (scripts / "tilefan").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tilefan.cli "$@"\n')
    (scripts / "tilefan").chmod(0o755)
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-eu", "-c", code]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout


def test_the_benchmarks_doc_and_bench_help_give_the_quick_profile_the_same_duration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    documented = re.search(
        r"make bench +# the quick profile: [^\n]*?(about [\d-]+ minutes)",
        (ROOT / "docs" / "benchmarks.md").read_text(),
    )
    assert documented is not None, "docs/benchmarks.md no longer describes `make bench`"
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    quick = re.search(r"--quick +([^()]*?\(the default\))", helped)
    assert quick is not None, helped
    assert documented.group(1) in quick.group(1), (documented.group(1), quick.group(1))

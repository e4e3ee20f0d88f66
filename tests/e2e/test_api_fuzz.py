"""schemathesis against the served OpenAPI document: no 5xx, no answer that breaks the schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tilefan.local.serve import serve_api

pytestmark = pytest.mark.e2e

KEY = "tf-fuzz"
EXAMPLES = int(os.environ.get("TILEFAN_FUZZ_EXAMPLES", "15"))
"""Examples per route and phase: a small budget in CI; raise it for a longer fuzzing run."""


def test_api_answers_every_generated_request_within_its_schema(tmp_path: Path) -> None:
    # The CLI rather than the pytest plugin: the plugin's fixture loader does not run under
    # pytest 9, and the CLI is how users run the same check against a deployment.
    schemathesis = Path(sys.executable).with_name("schemathesis")
    with serve_api(port=0, keys=[KEY]) as api:
        result = subprocess.run(
            [
                str(schemathesis),
                "run",
                f"{api.url}/openapi.json",
                "--url",
                api.url,
                "--header",
                f"x-api-key:{KEY}",
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--max-examples",
                str(EXAMPLES),
                "--generation-deterministic",
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            cwd=tmp_path,
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]

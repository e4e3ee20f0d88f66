"""`tilefan serve --data-dir`: a restart keeps finished jobs, results and keys; running jobs fail.

The server is started, used and stopped twice over one data directory, as a user would with
Ctrl-C between the runs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import tilefan.stages.process
from tests.e2e.support import create, submit
from tests.support import noise_image
from tilefan.imaging.execute import execute_tile
from tilefan.imaging.geometry import Rect
from tilefan.local.persistence import ENGINE_RESTARTED
from tilefan.local.serve import serve_api
from tilefan.service.client import ApiError, TilefanClient

pytestmark = pytest.mark.e2e

KEY = "tf-restart-owner"


def test_a_restart_keeps_finished_jobs_and_fails_running_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "noise.png"
    noise_image(200, 150, 3, seed=41).pngsave(str(image))
    data_dir = tmp_path / "data"
    gate = threading.Event()

    def held(chain: Any, spec: Any, block: Any, out: Rect) -> Any:
        if out.x or out.y:  # the first tile runs; the others wait past the stop
            gate.wait(30)
        return execute_tile(chain, spec, block, out)

    with serve_api(port=0, keys=[KEY], data_dir=data_dir) as first:
        client = TilefanClient(first.url, KEY)
        done = submit(client, image, tmp_path / "first.png")
        assert done.job["status"] == "SUCCEEDED"
        waiting = create(client, image.stat().st_size)  # created, never uploaded

        monkeypatch.setattr(tilefan.stages.process, "execute_tile", held)
        created = create(client, image.stat().st_size)
        running_id = created["job_id"]
        client.upload(image, created)
        client.request("POST", f"/jobs/{running_id}/start")
        deadline = time.monotonic() + 60
        # A batch records its tiles when it starts (RUNNING): the held batch shows as running.
        while (client.request("GET", f"/jobs/{running_id}").get("tiles") or {}).get(
            "running", 0
        ) < 1:
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.05)
        assert client.request("GET", f"/jobs/{running_id}")["status"] == "PROCESSING"
    gate.set()
    monkeypatch.undo()
    assert (data_dir / "api-keys.json").stat().st_mode & 0o077 == 0

    with serve_api(port=0, data_dir=data_dir) as second:
        assert second.keys == (KEY,)  # kept, so the caller's key still works
        assert second.restored is not None
        assert second.restored.failed_jobs == (running_id,)
        client = TilefanClient(second.url, KEY)

        finished = client.request("GET", f"/jobs/{done.job['job_id']}")
        assert finished["status"] == "SUCCEEDED"
        assert finished["tiles"] == done.job["tiles"]
        client.download(done.job["job_id"], tmp_path / "again.png")
        assert (tmp_path / "again.png").read_bytes() == done.output.read_bytes()

        ended = client.request("GET", f"/jobs/{running_id}")
        assert ended["status"] == "FAILED"
        assert ended["error"]["code"] == ENGINE_RESTARTED
        with pytest.raises(ApiError) as refused:
            client.request("GET", f"/jobs/{running_id}/result?redirect=false")
        assert refused.value.code == "RESULT_NOT_READY"

        # A job that was waiting for its upload still waits, and runs once it gets one.
        assert client.request("GET", f"/jobs/{waiting['job_id']}")["status"] == "CREATED"
        listed = {job["job_id"] for job in client.request("GET", "/jobs?limit=50")["jobs"]}
        assert listed == {done.job["job_id"], running_id, waiting["job_id"]}
        assert second.stack.service.store.list_keys("jobs/") == []

    # Without a data directory nothing is kept.
    with serve_api(port=0, keys=[KEY]) as third:
        assert third.data_dir is None
        assert TilefanClient(third.url, KEY).request("GET", "/jobs")["jobs"] == []

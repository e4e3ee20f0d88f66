"""Results that cannot be made are refused before any tile work, each with its code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pyvips

import tilefan.stages.split
from tilefan.errors import OutputTooLarge
from tilefan.local.stack import LOCAL_OWNER, LocalStack, run_job
from tilefan.state.jobs import JobStatus
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("fmt", "ops", "options", "width", "height", "reason"),
    [
        ("jpeg", [], {}, 70_000, 100, "jpeg stores at most 65,535 a side"),
        ("jpeg", [{"op": "rot", "angle": "d90"}], {}, 100, 65_536, "at most 65,535"),
        ("webp", [{"op": "resize", "scale": 2}], {}, 9_000, 100, "webp stores at most 16,383"),
        ("png", [], {}, 100_000, 60_000, "would take about"),
        ("webp", [], {"lossless": True}, 8_000, 8_000, "would take about"),
        ("webp", [], {}, 10_000, 10_000, "needs about"),
    ],
)
def test_creation_refuses_what_cannot_be_made_when_the_input_size_is_declared(
    stack: LocalStack,
    fmt: str,
    ops: list[dict[str, Any]],
    options: dict[str, Any],
    width: int,
    height: int,
    reason: str,
) -> None:
    with pytest.raises(OutputTooLarge, match=reason) as caught:
        stack.service.create(
            LOCAL_OWNER,
            ops,
            fmt,
            output_options=options,
            input_info={"size_bytes": 10, "width": width, "height": height},
        )
    assert caught.value.code == "OUTPUT_TOO_LARGE"


def test_creation_accepts_the_same_request_within_the_limits(stack: LocalStack) -> None:
    job = stack.service.create(
        LOCAL_OWNER, [], "jpeg", input_info={"size_bytes": 10, "width": 65_535, "height": 100}
    )
    assert job.status is JobStatus.CREATED


def test_the_splitter_refuses_before_decoding_when_no_size_was_declared(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "wide.png"
    pyvips.Image.black(1100, 20, bands=3).pngsave(str(source))
    decoded: list[str] = []
    real = tilefan.stages.split.transcode
    monkeypatch.setattr(
        tilefan.stages.split,
        "transcode",
        lambda image, *args: decoded.append(str(args[2])) or real(image, *args),
    )
    service = stack.service
    # What the API creates when the request does not declare the input's dimensions.
    job = service.create(
        LOCAL_OWNER,
        [{"op": "resize", "scale": 16}],
        "webp",
        input_info={"size_bytes": source.stat().st_size},
    )
    service.store.upload(source, keys.upload(job.job_id), "image/png")
    service.start(LOCAL_OWNER, job.job_id)
    stack.settle(job.job_id, timeout=120)
    ended = service.jobs.get(job.job_id)
    assert ended.status is JobStatus.FAILED
    assert ended.error is not None and ended.error["code"] == "OUTPUT_TOO_LARGE", ended.error
    assert "17,600x320" in ended.error["message"]
    assert decoded == [], "the input was decoded before it was refused"
    assert service.store.list_keys(keys.job_prefix(job.job_id)) == []


def test_a_local_run_declares_the_input_size_and_is_refused_before_it_starts(
    stack: LocalStack, tmp_path: Path
) -> None:
    source = tmp_path / "wide.png"
    pyvips.Image.black(1100, 20, bands=3).pngsave(str(source))
    before = stack.engine.client("stepfunctions").list_executions(
        stateMachineArn=stack.engine.state_machine_arn
    )["executions"]
    with pytest.raises(OutputTooLarge):
        run_job(
            stack,
            source,
            tmp_path / "out.webp",
            [{"op": "resize", "scale": 16}],
            output_format="webp",
        )
    after = stack.engine.client("stepfunctions").list_executions(
        stateMachineArn=stack.engine.state_machine_arn
    )["executions"]
    assert len(after) == len(before)

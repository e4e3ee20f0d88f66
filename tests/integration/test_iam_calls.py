"""Every AWS call each function makes is granted by its role: the grants derived from the code.

The API and the pipeline functions run on the embedded engine behind `tilefan serve`. Each
handler module builds its own boto3 clients, so a hook on those clients records exactly what that
function calls, from any of its threads, presigned URLs included (botocore builds their
parameters as for a call). Jobs then succeed (one PUT and multipart uploads), fail on a tile, are
cancelled while split and while processed, and are deleted; the recorded calls, turned into IAM
actions on the template's resources, must all be granted to the function's role in template.yaml.
"""

from __future__ import annotations

import inspect
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tilefan.stages.process
import tilefan.stages.reduction
import tilefan.stages.second_fanout
import tilefan.stages.split
import tilefan.state.multipart
from tests.e2e.support import raw, serving, wait_until_ended
from tests.support import compaction_groups_of_two, libvips_error, noise_image
from tests.unit.test_template_iam import (
    BUCKET,
    FUNCTION_ROLES,
    OWNER_INDEX,
    STATES,
    TABLE,
    load_template,
    role_grants,
)
from tilefan.local.serve import LocalApi
from tilefan.service.client import TilefanClient

pytestmark = pytest.mark.integration

KEY = "tf-iam-owner"
PART = 5 * 2**20
TILE = 256

Calls = dict[str, set[tuple[str, str]]]
"""Function logical id -> the (IAM action, resource) pairs its calls need."""

_S3_ACTIONS = {
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "UploadPartCopy": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
    "ListObjectsV2": "s3:ListBucket",
    "ListParts": "s3:ListMultipartUploadParts",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
}


def _object(key: str) -> str:
    return "${TilefanBucket.Arn}/" + key.split("/", 1)[0] + "/*"


def needed(service: str, operation: str, params: dict[str, Any]) -> set[tuple[str, str]]:
    """The IAM action and resource (as the template writes it) that one call needs."""
    if service == "s3":
        action = _S3_ACTIONS[operation]
        if operation in ("ListObjectsV2", "ListMultipartUploads"):
            return {(action, BUCKET)}
        if operation == "DeleteObjects":
            return {(action, _object(item["Key"])) for item in params["Delete"]["Objects"]}
        if operation == "UploadPartCopy":  # reads its source as GetObject does
            source = params["CopySource"]["Key"]
            return {(action, _object(params["Key"])), ("s3:GetObject", _object(source))}
        return {(action, _object(params["Key"]))}
    if service == "dynamodb":
        return {(f"dynamodb:{operation}", OWNER_INDEX if params.get("IndexName") else TABLE)}
    if service == "stepfunctions":
        if operation == "StartExecution":
            return {("states:StartExecution", "Ref:TilefanStateMachine")}
        return {(f"states:{operation}", f"{STATES}:execution:${{TilefanStateMachine.Name}}:*")}
    if service == "lambda" and operation == "Invoke":
        return {("lambda:InvokeFunction", f"{params['FunctionName'].rsplit(':', 1)[-1]}.Arn")}
    raise AssertionError(f"no IAM mapping for {service}:{operation}")


def clients_of(module: dict[str, Any]) -> list[Any]:
    """The boto3 clients a handler module built: its pipeline's, or the API's service's."""
    if "pipeline" in module:
        pipeline = module["pipeline"]
        return [pipeline.store.client, pipeline.jobs.table.meta.client]
    service = module["service"]
    return [
        service.store.client,
        service.jobs.table.meta.client,
        service.stepfunctions,
        service.functions,
        module["idempotency_store"].client,
    ]


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    settings = {"TILEFAN_MULTIPART_THRESHOLD": str(PART), "TILEFAN_MULTIPART_PART_SIZE": str(PART)}
    with serving([KEY], settings) as running:
        yield running


@pytest.fixture(scope="module")
def calls(api: LocalApi) -> Calls:
    recorded: Calls = defaultdict(set)
    lock = threading.Lock()
    for function in FUNCTION_ROLES:
        module = inspect.unwrap(api.stack.engine.handler(function)).__globals__

        def record(params: dict[str, Any], model: Any, function: str = function, **_: Any) -> None:
            service = model.service_model.service_name
            with lock:
                recorded[function] |= needed(service, model.name, params)

        for client in clients_of(module):
            client.meta.events.register("before-parameter-build", record)
    return recorded


def create(
    client: TilefanClient,
    source: Path,
    op: str = "invert",
    output_format: str = "tiff",
    options: dict[str, Any] | None = None,
) -> str:
    body = {
        "operations": [{"op": op}],
        "output": {"format": output_format, **(options or {})},
        "tile_size": TILE,
        "input": {"size_bytes": source.stat().st_size},
    }
    key = f"{source.name}-{output_format}-{sorted((options or {}).items())}"
    created = client.request("POST", "/jobs", body, {"Idempotency-Key": key})
    client.upload(source, created)
    return str(created["job_id"])


def test_every_call_each_function_makes_is_granted_to_its_role(
    api: LocalApi, calls: Calls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = TilefanClient(api.url, KEY)
    small, large = tmp_path / "small.png", tmp_path / "large.tif"
    noise_image(600, 500, 3, seed=1).pngsave(str(small))
    noise_image(1400, 1300, 3, seed=2).tiffsave(str(large))  # two multipart parts
    jobs: list[str] = []

    # Succeeds, uploaded by one PUT and by parts, as a DeepZoom set (the workers write its
    # tiles under results/) and as a streamed png with its preview; every read route is used
    # on it. The second has a statistics pass (its map, its band writes, the merger's reduce).
    for source, op, output_format in (
        (small, "invert", "tiff"),
        (large, "hist_equal", "tiff"),
        (small, "invert", "dzi"),
        (small, "invert", "png"),
    ):
        job_id = create(client, source, op, output_format)
        client.request("POST", f"/jobs/{job_id}/start")
        assert wait_until_ended(client, job_id)["status"] == "SUCCEEDED"
        client.request("GET", f"/jobs/{job_id}/tiles")
        client.request("GET", f"/jobs/{job_id}/result?redirect=false")
        # The page's viewer reads the set (the dzi's, a result's preview) through the API.
        view = client.request("GET", f"/jobs/{job_id}")["links"]["view"]
        with urllib.request.urlopen(api.url + view.replace("/view?", "/view/set/0/0/0?")) as tile:
            assert tile.status == 200
        jobs.append(job_id)
    client.request("GET", "/jobs")

    # A COG of more batches than a group (made two here), whose first coarse level is larger
    # than a fan-out group (made 256 px): the tile workers upload their batches by parts,
    # join the batches' small levels and reduce that level's groups, of the pyramid and of
    # the preview (the second fan-out), before the merge.
    groups = compaction_groups_of_two(monkeypatch)
    monkeypatch.setattr(tilefan.stages.reduction, "FANOUT_SIDE", 256)
    # Every batch's object by multipart upload, as a large batch's is (`put_joined`).
    monkeypatch.setattr(tilefan.state.multipart, "_JOINED_UP_TO", 0)
    reduced: list[str] = []
    real_reduce = tilefan.stages.second_fanout.reduce

    def reduce(pipeline: Any, job: str, kind: str, *args: Any) -> Any:
        reduced.append(kind)
        return real_reduce(pipeline, job, kind, *args)

    monkeypatch.setattr(tilefan.stages.second_fanout, "reduce", reduce)
    job_id = create(client, large, "invert", "tiff", {"pyramid": True})
    client.request("POST", f"/jobs/{job_id}/start")
    assert wait_until_ended(client, job_id)["status"] == "SUCCEEDED"
    assert groups
    assert set(reduced) == {"tiff", "preview"}
    jobs.append(job_id)
    monkeypatch.undo()

    # Fails on a tile: Abort reads the tile records and removes the intermediates.
    real_execute = tilefan.stages.process.execute_tile

    def broken(chain: Any, spec: Any, block: Any, out: Any) -> Any:
        if out.x == 0 and out.y == 0:
            raise libvips_error("injected")
        return real_execute(chain, spec, block, out)

    monkeypatch.setattr(tilefan.stages.process, "execute_tile", broken)
    source = tmp_path / "fails.png"
    noise_image(600, 500, 3, seed=3).pngsave(str(source))
    job_id = create(client, source)
    client.request("POST", f"/jobs/{job_id}/start")
    assert wait_until_ended(client, job_id)["status"] == "FAILED"
    jobs.append(job_id)
    monkeypatch.undo()

    # Cancelled while split, then while processed: each stage removes what it wrote.
    def cancel_then(real: Any) -> Any:
        cancelled: list[str] = []

        def run(*args: Any) -> Any:
            if not cancelled:  # once: a DELETE of an ended job would delete it
                cancelled.append(jobs[-1])
                raw(api, "DELETE", f"/jobs/{jobs[-1]}", KEY)
            return real(*args)

        return run

    real_transcode = tilefan.stages.split.transcode
    for target, name, real in (
        (tilefan.stages.split, "transcode", real_transcode),
        (tilefan.stages.process, "execute_tile", real_execute),
    ):
        source = tmp_path / f"cancel-{name}.png"
        noise_image(600, 500, 3, seed=4).pngsave(str(source))
        jobs.append(create(client, source))
        monkeypatch.setattr(target, name, cancel_then(real))
        client.request("POST", f"/jobs/{jobs[-1]}/start")
        assert wait_until_ended(client, jobs[-1])["status"] == "CANCELLED"
        api.stack.settle(jobs[-1])
        monkeypatch.undo()

    # Deleted: the cleanup removes every object and tile item, off the request path.
    for job_id in jobs:
        client.request("DELETE", f"/jobs/{job_id}")
    store = api.stack.service.store
    deadline = time.monotonic() + 60
    while store.list_keys("") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.list_keys("") == []

    template = load_template()
    ungranted = {}
    for function, role in FUNCTION_ROLES.items():
        grants = role_grants(template["Resources"][role])
        missing = {
            (action, resource)
            for action, resource in calls[function]
            if resource not in grants.get(action, set())
        }
        if missing:
            ungranted[function] = sorted(missing)
    assert ungranted == {}
    # The scenarios reached the calls the grants are there for.
    assert ("s3:DeleteObject", "${TilefanBucket.Arn}/jobs/*") in calls["SplitterFunction"]
    # A cancelled worker's own deletes race the cleanup's (which may leave it nothing to delete),
    # so they are checked against the role above when made, not required here.
    assert ("s3:DeleteObject", "${TilefanBucket.Arn}/uploads/*") in calls["MergerFunction"]
    assert ("dynamodb:BatchWriteItem", TABLE) in calls["MergerFunction"]
    assert ("lambda:InvokeFunction", "MergerFunction.Arn") in calls["ApiFunction"]
    assert ("dynamodb:Query", OWNER_INDEX) in calls["ApiFunction"]

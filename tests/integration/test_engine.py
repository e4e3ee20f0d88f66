"""The embedded engine: the template's resources and state machine on moto, handlers in-process."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import tracemalloc
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from cfnlint.decode.cfn_yaml import load as load_cfn_yaml  # type: ignore[import-untyped]

from tests.support import noise_image
from tilefan.errors import TileFailed, TooManyPixels, TransientError
from tilefan.local import stack as local
from tilefan.local.engine import EmbeddedEngine, LambdaContext
from tilefan.local.signing import SignatureCheck
from tilefan.state.jobs import JobStatus
from tilefan.state.storage import TileStore

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[dict[str, Any], Any], Any]


class Recorder:
    """Fake handlers for the three pipeline functions that record what they were given."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.lock = threading.Lock()
        self.items: list[Any] = []
        self.merger_events: list[dict[str, Any]] = []
        self.contexts: list[Any] = []

    def splitter(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        # Like the real splitter: reads the bucket from the environment, writes the manifest.
        key = f"jobs/{event['job_id']}/manifest.json"
        manifest = [
            {"batch": index, "tiles": [2 * index, 2 * index + 1]} for index in range(self.batches)
        ]
        boto3.client("s3").put_object(
            Bucket=os.environ["TILEFAN_BUCKET"], Key=key, Body=json.dumps(manifest).encode()
        )
        return {
            "manifest_key": key,
            "tile_count": 2 * self.batches,
            "batch_count": self.batches,
            "statistics_manifest_key": None,
            "fanout_manifest_key": None,
        }

    def worker(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        with self.lock:
            self.items.append(event["item"]["batch"])
            self.contexts.append(context)
        return {"tiles": len(event["item"]["tiles"])}

    def merger(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        with self.lock:
            self.merger_events.append(event)
        return {"action": event["action"]}

    def handlers(self, **overrides: Handler) -> dict[str, Handler]:
        return {
            "SplitterFunction": self.splitter,
            "TileWorkerFunction": self.worker,
            "MergerFunction": self.merger,
            **overrides,
        }


def run_job(engine: EmbeddedEngine, *, max_concurrency: int, timeout: float = 30) -> dict[str, Any]:
    return engine.wait(engine.start_job("job-1", max_concurrency=max_concurrency), timeout=timeout)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    # cfn-lint's own loader: an independent reading of the template, not the engine's.
    document: dict[str, Any] = load_cfn_yaml(str(PROJECT_ROOT / "template.yaml"))
    return document


def test_engine_builds_bucket_table_and_state_machine_from_the_template(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    table_props = resources["JobsTable"]["Properties"]
    session = boto3.DEFAULT_SESSION
    environment = dict(os.environ)
    with EmbeddedEngine(handlers=Recorder(1).handlers()) as engine:
        s3 = engine.client("s3")
        s3.head_bucket(Bucket=engine.bucket)
        block = s3.get_public_access_block(Bucket=engine.bucket)["PublicAccessBlockConfiguration"]
        assert block == resources["TilefanBucket"]["Properties"]["PublicAccessBlockConfiguration"]
        rules = s3.get_bucket_encryption(Bucket=engine.bucket)["ServerSideEncryptionConfiguration"]
        assert rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

        dynamodb = engine.client("dynamodb")
        table = dynamodb.describe_table(TableName=engine.table)["Table"]
        assert table["KeySchema"] == table_props["KeySchema"]
        assert sorted(table["AttributeDefinitions"], key=str) == sorted(
            table_props["AttributeDefinitions"], key=str
        )
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        ttl = dynamodb.describe_time_to_live(TableName=engine.table)["TimeToLiveDescription"]
        assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}

        machine = engine.client("stepfunctions").describe_state_machine(
            stateMachineArn=engine.state_machine_arn
        )
        definition = json.loads(machine["definition"])
        asl = json.loads((PROJECT_ROOT / "statemachine/tilefan.asl.json").read_text())
        assert definition.keys() == asl.keys()
        assert definition["States"].keys() == asl["States"].keys()
        assert "${" not in machine["definition"]
        reader = definition["States"]["ProcessTiles"]["ItemReader"]["Parameters"]
        assert reader["Bucket"] == engine.bucket
        split = definition["States"]["Split"]["Parameters"]["FunctionName"]
        assert split.endswith(":function:SplitterFunction")

        variables = template["Globals"]["Function"]["Environment"]["Variables"]
        assert os.environ["TILEFAN_BUCKET"] == engine.bucket
        assert os.environ["TILEFAN_TABLE"] == engine.table
        assert os.environ["TILEFAN_STATE_MACHINE_ARN"] == engine.state_machine_arn
        assert os.environ["TILEFAN_TILE_SIZE"] == str(template["Parameters"]["TileSize"]["Default"])
        assert os.environ["POWERTOOLS_SERVICE_NAME"] == variables["POWERTOOLS_SERVICE_NAME"]
        assert "AWS_ENDPOINT_URL" not in os.environ  # it would bypass moto's patching
    # The process is put back as it was.
    assert boto3.DEFAULT_SESSION is session
    assert dict(os.environ) == environment


def test_every_manifest_item_is_processed_exactly_once() -> None:
    recorder = Recorder(batches=300)
    with EmbeddedEngine(handlers=recorder.handlers()) as engine:
        result = run_job(engine, max_concurrency=8)
        assert result["status"] == "SUCCEEDED", result
        output = json.loads(result["output"])
        assert output["split"] == {
            "manifest_key": "jobs/job-1/manifest.json",
            "tile_count": 600,
            "batch_count": 300,
            "statistics_manifest_key": None,
            "fanout_manifest_key": None,
        }
        assert "error" not in output
    assert Counter(recorder.items) == Counter(range(300))
    assert recorder.merger_events == [
        {"action": "merge", "job_id": "job-1"},
        {"action": "cleanup", "job_id": "job-1"},
    ]
    context = recorder.contexts[0]
    assert context.function_name == "TileWorkerFunction"
    assert context.invoked_function_arn.endswith(":function:TileWorkerFunction")
    assert context.memory_limit_in_mb == 2048
    assert 0 < context.get_remaining_time_in_millis() <= 300_000


def test_transient_errors_are_retried_until_the_item_succeeds() -> None:
    recorder = Recorder(batches=6)
    attempts: Counter[int] = Counter()

    def flaky_worker(event: dict[str, Any], context: Any) -> dict[str, Any]:
        batch = event["item"]["batch"]
        with recorder.lock:
            attempts[batch] += 1
            first = attempts[batch] == 1
        if first:
            raise TransientError("storage hiccup")
        return recorder.worker(event, context)

    with EmbeddedEngine(handlers=recorder.handlers(TileWorkerFunction=flaky_worker)) as engine:
        result = run_job(engine, max_concurrency=6)
    assert result["status"] == "SUCCEEDED", result
    assert attempts == Counter({batch: 2 for batch in range(6)})
    assert sorted(recorder.items) == list(range(6))
    assert [event["action"] for event in recorder.merger_events] == ["merge", "cleanup"]


def test_a_failing_tile_runs_abort_and_fails_the_execution() -> None:
    recorder = Recorder(batches=4)

    def broken_worker(event: dict[str, Any], context: Any) -> None:
        raise TileFailed(f"batch {event['item']['batch']} cannot be processed")

    with EmbeddedEngine(handlers=recorder.handlers(TileWorkerFunction=broken_worker)) as engine:
        result = run_job(engine, max_concurrency=2)
    assert result["status"] == "FAILED", result
    # As on AWS, a Distributed Map whose items fail reports the threshold, not the item's error.
    [abort] = recorder.merger_events
    assert abort["action"] == "abort"
    assert abort["job_id"] == "job-1"
    assert abort["error"]["Error"] == "States.ExceedToleratedFailureThreshold"
    assert "4 of 4 items failed" in abort["error"]["Cause"]
    assert result["error"] == "JobFailed"
    assert result["cause"].startswith("States.ExceedToleratedFailureThreshold: ")


def test_a_failing_split_runs_abort_without_processing_or_merging() -> None:
    recorder = Recorder(batches=4)

    def refusing_splitter(event: dict[str, Any], context: Any) -> None:
        raise TooManyPixels("the source declares 1e12 pixels")

    handlers = recorder.handlers(SplitterFunction=refusing_splitter)
    with EmbeddedEngine(handlers=handlers) as engine:
        result = run_job(engine, max_concurrency=2)
    assert result["status"] == "FAILED", result
    assert result["error"] == "JobFailed"
    assert result["cause"].startswith("TooManyPixels: ")
    assert recorder.items == []
    assert [(e["action"], e["error"]["Error"]) for e in recorder.merger_events] == [
        ("abort", "TooManyPixels")
    ]


def test_an_execution_without_max_concurrency_uses_the_template_default(
    template: dict[str, Any],
) -> None:
    recorder = Recorder(batches=3)
    with EmbeddedEngine(handlers=recorder.handlers()) as engine:
        sfn = engine.client("stepfunctions")
        started = sfn.start_execution(
            stateMachineArn=engine.state_machine_arn, name="no-max", input='{"job_id": "job-1"}'
        )
        result = engine.wait(started["executionArn"], timeout=30)
    assert result["status"] == "SUCCEEDED", result
    default = template["Parameters"]["MaxConcurrency"]["Default"]
    assert json.loads(result["output"])["max_concurrency"] == default  # a number, not "100"
    assert sorted(recorder.items) == [0, 1, 2]


def test_tile_workers_run_in_parallel_up_to_max_concurrency() -> None:
    recorder = Recorder(batches=12)
    intervals: list[tuple[float, float]] = []

    def slow_worker(event: dict[str, Any], context: Any) -> None:
        start = time.monotonic()
        time.sleep(0.15)
        with recorder.lock:
            intervals.append((start, time.monotonic()))

    with EmbeddedEngine(handlers=recorder.handlers(TileWorkerFunction=slow_worker)) as engine:
        result = run_job(engine, max_concurrency=4)
    assert result["status"] == "SUCCEEDED", result
    assert len(intervals) == 12
    assert 2 <= max_overlap(intervals) <= 4


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def test_concurrent_dynamodb_updates_are_not_lost() -> None:
    with EmbeddedEngine(handlers=Recorder(1).handlers()) as engine:
        dynamodb = engine.client("dynamodb")
        key = {"pk": {"S": "JOB#counter"}, "sk": {"S": "JOB"}}

        def add_one(_: int) -> None:
            dynamodb.update_item(
                TableName=engine.table,
                Key=key,
                UpdateExpression="ADD done :one",
                ExpressionAttributeValues={":one": {"N": "1"}},
            )

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(add_one, range(200)))
        item = dynamodb.get_item(TableName=engine.table, Key=key, ConsistentRead=True)["Item"]
    assert item["done"] == {"N": "200"}


def test_handlers_are_loaded_from_each_functions_code_uri(tmp_path: Path) -> None:
    # A copy of the project's template and state machine, with handler files written here.
    shutil.copy(PROJECT_ROOT / "template.yaml", tmp_path)
    shutil.copytree(PROJECT_ROOT / "statemachine", tmp_path / "statemachine")
    handlers = {
        "splitter": """
import json, os, boto3
from helper import manifest  # a sibling module, importable as on Lambda
def lambda_handler(event, context):
    key = "jobs/" + event["job_id"] + "/manifest.json"
    boto3.client("s3").put_object(Bucket=os.environ["TILEFAN_BUCKET"], Key=key, Body=manifest())
    return {
        "manifest_key": key,
        "tile_count": 3,
        "batch_count": 3,
        "statistics_manifest_key": None,
        "fanout_manifest_key": None,
    }
""",
        "tile_worker": """
import os, boto3
def lambda_handler(event, context):
    boto3.client("dynamodb").put_item(
        TableName=os.environ["TILEFAN_TABLE"],
        Item={"pk": {"S": "JOB#" + event["job_id"]}, "sk": {"S": "TILE#%d" % event["item"]},
              "by": {"S": context.function_name}},
    )
""",
        "merger": """
def lambda_handler(event, context):
    return {"merged": event["job_id"]}
""",
    }
    for directory, source in handlers.items():
        (tmp_path / directory).mkdir()
        (tmp_path / directory / "app.py").write_text(source)
    (tmp_path / "splitter" / "helper.py").write_text(
        "import json\ndef manifest():\n    return json.dumps([0, 1, 2]).encode()\n"
    )

    with EmbeddedEngine(tmp_path) as engine:
        result = run_job(engine, max_concurrency=2)
        assert result["status"] == "SUCCEEDED", result
        assert json.loads(result["output"])["merge"] == {"output": {"merged": "job-1"}}
        items = engine.client("dynamodb").scan(TableName=engine.table)["Items"]
    assert sorted(item["sk"]["S"] for item in items) == ["TILE#0", "TILE#1", "TILE#2"]
    assert {item["by"]["S"] for item in items} == {"TileWorkerFunction"}


def test_server_mode_serves_presigned_uploads_and_runs_executions() -> None:
    recorder = Recorder(batches=20)
    session = boto3.DEFAULT_SESSION
    environment = dict(os.environ)
    with EmbeddedEngine(server=True, handlers=recorder.handlers()) as engine:
        assert engine.endpoint_url is not None
        assert engine.endpoint_url.startswith("http://127.0.0.1:")
        assert os.environ["AWS_ENDPOINT_URL"] == engine.endpoint_url

        # Any HTTP client on this machine can use a presigned URL. urllib's default
        # Content-Type is application/x-www-form-urlencoded; S3 keeps the bytes as sent.
        s3 = engine.client("s3")
        url = s3.generate_presigned_url(
            "put_object", Params={"Bucket": engine.bucket, "Key": "uploads/j/source"}, ExpiresIn=60
        )
        assert url.startswith(engine.endpoint_url)
        request = urllib.request.Request(url, data=b"not really an image", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        body = s3.get_object(Bucket=engine.bucket, Key="uploads/j/source")["Body"].read()
        assert body == b"not really an image"

        # The interpreter runs in the server's threads; the same hook answers its Lambda calls.
        result = run_job(engine, max_concurrency=4)
        assert result["status"] == "SUCCEEDED", result
    assert Counter(recorder.items) == Counter(range(20))
    assert recorder.merger_events == [
        {"action": "merge", "job_id": "job-1"},
        {"action": "cleanup", "job_id": "job-1"},
    ]
    assert boto3.DEFAULT_SESSION is session
    assert dict(os.environ) == environment


def test_an_upload_through_the_server_holds_a_few_parts_not_the_file(tmp_path: Path) -> None:
    # The client and the engine's server share the process (`tilefan run`), and the server
    # holds each part about three times while it passes: the upload's peak is a few parts in
    # flight, whatever the file's size. With 64 MiB parts it was 1,109 MB for this file.
    source = tmp_path / "source"
    with source.open("wb") as sparse:
        sparse.truncate(400 * 2**20)
    with EmbeddedEngine(server=True, handlers=Recorder(batches=1).handlers()) as engine:
        store = TileStore(engine.bucket, client=engine.client("s3"))
        tracemalloc.start()
        try:
            store.upload(source, "uploads/j/source", "application/octet-stream")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        head = engine.client("s3").head_object(Bucket=engine.bucket, Key="uploads/j/source")
    assert head["ContentLength"] == 400 * 2**20
    assert peak < 300 * 2**20, f"the upload held {peak / 2**20:.0f} MB"


def test_only_one_engine_runs_at_a_time() -> None:
    with EmbeddedEngine(handlers=Recorder(1).handlers()), pytest.raises(RuntimeError):
        EmbeddedEngine(handlers=Recorder(1).handlers()).__enter__()


def test_unknown_handler_names_are_refused() -> None:
    with pytest.raises(ValueError, match="NoSuchFunction"):
        EmbeddedEngine(handlers={"NoSuchFunction": lambda event, context: None})


def test_lambda_context_counts_down_from_the_function_timeout() -> None:
    context = LambdaContext("F", timeout_s=3)
    assert 2900 < context.get_remaining_time_in_millis() <= 3000
    assert context.invoked_function_arn == "arn:aws:lambda:us-east-1:123456789012:function:F"
    assert context.log_group_name == "/aws/lambda/F"


def test_engine_hands_out_the_handler_it_runs_for_a_function() -> None:
    recorder = Recorder(1)
    with EmbeddedEngine(handlers=recorder.handlers()) as engine:
        assert engine.handler("MergerFunction") == recorder.merger
        with pytest.raises(KeyError):
            engine.handler("NoSuchFunction")


def test_the_interpreters_clients_sign_with_the_engines_key_and_get_it_back() -> None:
    # moto builds every client of its interpreter in boto_client_for with the key "ak"; the
    # engine swaps that module's boto3. If moto moves or renames it, this fails.
    from moto.stepfunctions.parser.asl.utils import boto_client

    original = boto_client.boto3  # type: ignore[attr-defined]
    with EmbeddedEngine(server=True) as engine:
        credentials = boto_client.boto_client_for("us-east-1", "s3")._request_signer._credentials
        assert credentials.access_key == engine.credentials.access_key
        assert credentials.secret_key == engine.credentials.secret_key
        assert os.environ["AWS_ACCESS_KEY_ID"] == engine.credentials.access_key
        assert "testing" not in (engine.credentials.access_key, engine.credentials.secret_key)
    assert boto_client.boto3 is original  # type: ignore[attr-defined]
    with EmbeddedEngine(server=True) as again:
        assert again.credentials != engine.credentials  # a new key at every start


def test_the_storage_endpoint_listens_on_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedEngine(server=True, host="0.0.0.0")


def test_the_interpreter_speedups_find_what_they_replace_in_moto() -> None:
    # The speed-ups are skipped quietly if moto moves what they replace; this says when it has.
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils
    from moto.stepfunctions.parser.asl.utils import boto_client, json_path

    with EmbeddedEngine():
        assert lambda_eval_utils.boto_client_for is not boto_client.boto_client_for
        assert hasattr(json_path.parse, "cache_info")
    assert lambda_eval_utils.boto_client_for is boto_client.boto_client_for
    assert not hasattr(json_path.parse, "cache_info")


def test_function_processes_leave_bodies_out_of_their_signatures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on AWS, where their clients send over HTTPS with a checksum: over the engine's plain
    # HTTP each body was hashed by the function and again by the endpoint.
    declared: list[tuple[str, str]] = []
    original = SignatureCheck._verify

    def verify(check: SignatureCheck, environ: Any, body: bytes) -> None:
        if environ["REQUEST_METHOD"] == "PUT":
            declared.append((environ["PATH_INFO"], environ.get("HTTP_X_AMZ_CONTENT_SHA256", "")))
        original(check, environ, body)

    monkeypatch.setattr(SignatureCheck, "_verify", verify)
    source = tmp_path / "source.png"
    noise_image(700, 500, 3, seed=5).pngsave(str(source))
    with local.local_stack(processes=True, function_logs=False) as running:
        view = local.run_job(
            running,
            source,
            tmp_path / "out.tif",
            [{"op": "invert"}],
            output_format="tiff",
            tile_size=256,
        )
    assert view.job.status is JobStatus.SUCCEEDED, view.job.error
    from_functions = [value for path, value in declared if "/jobs/" in path]
    assert from_functions, declared
    assert {value for _, value in declared} == {"UNSIGNED-PAYLOAD"}


def test_an_engines_process_parses_source_one_thread_at_a_time() -> None:
    # CPython 3.11's AST constructor fails when two threads build trees at once; tracebacks
    # parse source lines, and a merger failed so while another function formatted one.
    import ast

    from tilefan.local import engine as engine_module

    with EmbeddedEngine(handlers={}):
        parsed = threading.Event()

        def parse() -> None:
            ast.parse("x = (1 + (2 * (3 - 4)))")
            parsed.set()

        with engine_module._AST_PARSE_LOCK:
            other = threading.Thread(target=parse)
            other.start()
            assert not parsed.wait(0.3)  # waits for the thread in a parse
        assert parsed.wait(5)
        other.join()

"""template.yaml is complete: storage, functions, settings, logging, tracing and outputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode.cfn_yaml import load as load_cfn_yaml  # type: ignore[import-untyped]

from tilefan.local.engine import load_template
from tilefan.settings import Settings
from tilefan.state.jobs import JobRepository

pytestmark = pytest.mark.unit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = {
    "ApiFunction": "api/",
    "SplitterFunction": "splitter/",
    "TileWorkerFunction": "tile_worker/",
    "MergerFunction": "merger/",
}
# Settings that name a resource of the stack, or carry its secret: not tuning values.
RESOURCE_SETTINGS = {"bucket", "table", "state_machine_arn", "view_secret", "cleanup_function"}
# Settings a deployment leaves at the code's default on purpose.
UNSET_SETTINGS = {"max_pixels_per_byte"}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    document: dict[str, Any] = load_cfn_yaml(str(PROJECT_ROOT / "template.yaml"))
    return document


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = template["Resources"]
    return found


def ref(name: str) -> dict[str, str]:
    return {"Ref": name}


def variables(template: dict[str, Any], function: str) -> dict[str, Any]:
    """A function's environment, Globals included."""
    merged = dict(template["Globals"]["Function"]["Environment"]["Variables"])
    own = template["Resources"][function]["Properties"].get("Environment", {})
    merged.update(own.get("Variables", {}))
    return merged


# --- storage ---------------------------------------------------------------------------------


def test_bucket_is_private_encrypted_and_retained(resources: dict[str, Any]) -> None:
    bucket = resources["TilefanBucket"]
    assert bucket["DeletionPolicy"] == bucket["UpdateReplacePolicy"] == "Retain"
    properties = bucket["Properties"]
    assert all(properties["PublicAccessBlockConfiguration"].values())
    assert len(properties["PublicAccessBlockConfiguration"]) == 4
    [rule] = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert properties["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]


def test_bucket_refuses_requests_without_tls(resources: dict[str, Any]) -> None:
    policy = resources["TilefanBucketPolicy"]["Properties"]
    assert policy["Bucket"] == ref("TilefanBucket")
    [statement] = policy["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == "*"
    assert statement["Action"] == "s3:*"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert statement["Resource"] == [
        {"Fn::GetAtt": ["TilefanBucket", "Arn"]},
        {"Fn::Sub": "${TilefanBucket.Arn}/*"},
    ]


def test_browsers_may_put_presigned_uploads_and_read_part_etags(resources: dict[str, Any]) -> None:
    [rule] = resources["TilefanBucket"]["Properties"]["CorsConfiguration"]["CorsRules"]
    assert {"PUT", "GET"} <= set(rule["AllowedMethods"])
    assert "ETag" in rule["ExposedHeaders"]  # a multipart client completes with each part's ETag
    assert rule["AllowedOrigins"] == ref("CorsAllowedOrigins")
    assert rule["AllowedHeaders"] == ["*"]  # Content-Type and the signed x-amz-* headers


def test_lifecycle_expires_intermediates_and_abandoned_uploads(
    template: dict[str, Any], resources: dict[str, Any]
) -> None:
    rules = {
        rule["Id"]: rule
        for rule in resources["TilefanBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    }
    assert all(rule["Status"] == "Enabled" for rule in rules.values())
    tiles = rules["ExpireIntermediateTiles"]
    assert (tiles["Prefix"], tiles["ExpirationInDays"]) == ("jobs/", ref("IntermediateExpiryDays"))
    aborts = rules["AbortAbandonedMultipartUploads"]
    assert "Prefix" not in aborts  # the whole bucket: uploads and the merger's result uploads
    assert aborts["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": ref("AbandonedUploadDays")
    }
    # Objects go with their job records (DynamoDB TTL after JobRetentionDays).
    for prefix in ("uploads/", "results/"):
        [rule] = [rule for rule in rules.values() if rule.get("Prefix") == prefix]
        assert rule["ExpirationInDays"] == ref("JobRetentionDays")
    assert variables(template, "ApiFunction")["TILEFAN_JOB_TTL_DAYS"] == ref("JobRetentionDays")


def test_table_is_on_demand_with_ttl_and_point_in_time_recovery(
    resources: dict[str, Any],
) -> None:
    table = resources["JobsTable"]
    assert table["DeletionPolicy"] == table["UpdateReplacePolicy"] == "Retain"
    properties = table["Properties"]
    assert properties["BillingMode"] == "PAY_PER_REQUEST"
    assert properties["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert properties["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert properties["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    [index] = properties["GlobalSecondaryIndexes"]
    assert index["IndexName"] == "owner-created"
    assert [key["AttributeName"] for key in index["KeySchema"]] == ["gsi1pk", "gsi1sk"]


def test_the_code_queries_the_index_the_template_declares() -> None:
    source = Path(JobRepository.__module__.replace(".", "/") + ".py")
    text = (PROJECT_ROOT / source).read_text(encoding="utf-8")
    assert re.findall(r'"IndexName": "([\w-]+)"', text) == ["owner-created"]
    assert '"expires_at"' in text


# --- functions -------------------------------------------------------------------------------


def test_functions_run_python_312_with_tracing_and_both_layers(template: dict[str, Any]) -> None:
    function_globals = template["Globals"]["Function"]
    # pyvips-binary ships manylinux_2_28 wheels only: Amazon Linux 2023 runtimes (3.12+).
    assert function_globals["Runtime"] == "python3.12"
    assert function_globals["Architectures"] == [ref("Architecture")]
    assert function_globals["Tracing"] == "Active"
    assert function_globals["Layers"] == [ref("VipsLayer"), ref("CoreLayer")]
    for layer in ("VipsLayer", "CoreLayer"):
        properties = template["Resources"][layer]["Properties"]
        assert properties["CompatibleRuntimes"] == [function_globals["Runtime"]]
        assert properties["CompatibleArchitectures"] == [ref("Architecture")]
        assert template["Resources"][layer]["Metadata"]["BuildMethod"] == "makefile"


@pytest.mark.parametrize(("function", "code_uri"), FUNCTIONS.items())
def test_each_function_is_built_by_its_own_makefile(
    resources: dict[str, Any], function: str, code_uri: str
) -> None:
    resource = resources[function]
    assert resource["Properties"]["CodeUri"] == code_uri
    # No pip builder: it would need a local python3.12 and cannot resolve pyvips-binary.
    assert resource["Metadata"] == {"BuildMethod": "makefile"}
    makefile = (PROJECT_ROOT / code_uri / "Makefile").read_text(encoding="utf-8")
    assert re.search(rf"^build-{function}:", makefile, flags=re.MULTILINE)
    assert (PROJECT_ROOT / code_uri / "app.py").is_file()


@pytest.mark.parametrize("function", FUNCTIONS)
def test_each_function_logs_to_its_own_group_with_retention(
    resources: dict[str, Any], function: str
) -> None:
    properties = resources[function]["Properties"]
    group = f"{function}LogGroup"
    assert properties["LoggingConfig"] == {"LogGroup": ref(group)}
    assert resources[group]["Properties"]["RetentionInDays"] == ref("LogRetentionDays")


def test_memory_timeout_and_storage_are_set_per_function(
    template: dict[str, Any], resources: dict[str, Any]
) -> None:
    parameters = template["Parameters"]
    for function in FUNCTIONS:
        memory = resources[function]["Properties"]["MemorySize"]
        assert memory == ref(function.removesuffix("Function") + "MemorySize")
        assert parameters[memory["Ref"]]["MaxValue"] == 10240
    assert resources["TileWorkerFunction"]["Properties"]["Timeout"] == ref("TileWorkerTimeout")
    # Below API Gateway's 29 s, so a slow request ends in the function, which logs it.
    assert resources["ApiFunction"]["Properties"]["Timeout"] < 29
    # The merger writes nothing to /tmp (results are assembled or streamed by multipart).
    for serial, default in (("SplitterFunction", 10240), ("MergerFunction", 512)):
        properties = resources[serial]["Properties"]
        assert properties["Timeout"] == 900
        storage = properties["EphemeralStorage"]["Size"]
        assert storage == ref(serial.removesuffix("Function") + "EphemeralStorage")
        assert parameters[storage["Ref"]]["Default"] == default
    # The API and the splitter refuse results the merger could not encode in its time.
    merger_timeout = template["Globals"]["Function"]["Environment"]["Variables"]
    assert (
        int(merger_timeout["TILEFAN_MERGER_TIMEOUT"])
        == (resources["MergerFunction"]["Properties"]["Timeout"])
    )


def test_engine_reads_memory_sizes_from_the_parameters() -> None:
    stack = load_template(PROJECT_ROOT)
    assert stack.functions["TileWorkerFunction"].memory_mb == 2048
    assert stack.functions["TileWorkerFunction"].timeout_s == 300
    tuned = load_template(PROJECT_ROOT, {"TileWorkerMemorySize": "4096"})
    assert tuned.functions["TileWorkerFunction"].memory_mb == 4096


def test_engine_lets_the_environment_override_settings_but_not_resource_names() -> None:
    settings = load_template(PROJECT_ROOT).setting_variables()
    assert {"TILEFAN_TILES_PER_ITEM", "TILEFAN_TILE_ENCODING", "TILEFAN_MULTIPART_THRESHOLD"} <= (
        settings
    )
    assert not {"TILEFAN_BUCKET", "TILEFAN_TABLE", "TILEFAN_STATE_MACHINE_ARN"} & settings


# --- settings --------------------------------------------------------------------------------


def test_every_tilefan_variable_is_a_setting_and_every_setting_is_set(
    template: dict[str, Any],
) -> None:
    fields = set(Settings.model_fields)
    set_anywhere: set[str] = set()
    for function in FUNCTIONS:
        names = {
            name.removeprefix("TILEFAN_").lower()
            for name in variables(template, function)
            if name.startswith("TILEFAN_")
        }
        assert names <= fields, f"{function} sets unknown settings {names - fields}"
        assert {"bucket", "table"} <= names
        set_anywhere |= names
    assert set_anywhere == fields - UNSET_SETTINGS
    assert "TILEFAN_STATE_MACHINE_ARN" in variables(template, "ApiFunction")


def test_template_defaults_equal_the_codes_defaults(template: dict[str, Any]) -> None:
    # A deployment and the embedded engine (which runs the code's defaults unless told
    # otherwise) then process a job alike.
    parameters = template["Parameters"]
    defaults = Settings.model_fields
    for function in FUNCTIONS:
        for name, value in variables(template, function).items():
            field = name.removeprefix("TILEFAN_").lower()
            if not name.startswith("TILEFAN_") or field in RESOURCE_SETTINGS:
                continue
            if isinstance(value, dict) and "Fn::Join" in value:  # a CommaDelimitedList
                value = parameters[value["Fn::Join"][1]["Ref"]]["Default"]
            elif isinstance(value, dict):
                value = parameters[value["Ref"]]["Default"]
            assert str(value) == str(defaults[field].default), name


def test_tile_size_bounds_match_the_planner(template: dict[str, Any]) -> None:
    from tilefan.imaging.plan import MAX_TILE_SIZE, MIN_TILE_SIZE

    tile_size = template["Parameters"]["TileSize"]
    assert (tile_size["MinValue"], tile_size["MaxValue"]) == (MIN_TILE_SIZE, MAX_TILE_SIZE)


def test_structured_logging_settings(template: dict[str, Any]) -> None:
    environment = template["Globals"]["Function"]["Environment"]["Variables"]
    assert environment["POWERTOOLS_SERVICE_NAME"] == "tilefan"
    assert environment["LOG_LEVEL"] == ref("LogLevel")
    assert template["Parameters"]["LogLevel"]["Default"] == "INFO"


def test_tuning_parameters_exist(template: dict[str, Any]) -> None:
    assert {
        "TileSize",
        "MaxConcurrency",
        "MaxPixels",
        "ApiMemorySize",
        "SplitterMemorySize",
        "TileWorkerMemorySize",
        "MergerMemorySize",
        "Architecture",
    } <= set(template["Parameters"])
    assert template["Parameters"]["Architecture"]["Default"] == "arm64"
    assert template["Parameters"]["Architecture"]["AllowedValues"] == ["arm64", "x86_64"]


# --- state machine, API, outputs -------------------------------------------------------------


def test_state_machine_logs_to_its_group_at_a_chosen_level_and_traces(
    template: dict[str, Any], resources: dict[str, Any]
) -> None:
    properties = resources["TilefanStateMachine"]["Properties"]
    logging = properties["Logging"]
    assert logging["Level"] == ref("StateMachineLogLevel")
    level = template["Parameters"]["StateMachineLogLevel"]
    assert {"ALL", "ERROR"} <= set(level["AllowedValues"])
    assert level["Default"] == "ERROR"
    assert logging["Destinations"] == [
        {"CloudWatchLogsLogGroup": {"LogGroupArn": {"Fn::GetAtt": ["StateMachineLogGroup", "Arn"]}}}
    ]
    group = resources["StateMachineLogGroup"]["Properties"]
    assert group["LogGroupName"]["Fn::Sub"].startswith("/aws/vendedlogs/states/")
    assert properties["Tracing"] == {"Enabled": True}


def test_api_needs_a_key_and_has_a_usage_plan(resources: dict[str, Any]) -> None:
    properties = resources["TilefanApi"]["Properties"]
    assert properties["Auth"]["ApiKeyRequired"] is True
    assert properties["Auth"]["UsagePlan"]["CreateUsagePlan"] == "PER_API"
    assert properties["TracingEnabled"] is True
    event = resources["ApiFunction"]["Properties"]["Events"]["Proxy"]["Properties"]
    assert event["RestApiId"] == ref("TilefanApi")


def test_outputs_tell_a_user_everything_deploy_md_uses(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert {"ApiUrl", "ApiKeyId", "BucketName", "TableName", "StateMachineArn"} <= set(outputs)
    assert outputs["ApiKeyId"]["Value"] == ref("TilefanApiApiKey")  # generated by SAM's Auth
    assert outputs["ApiUrl"]["Value"]["Fn::Sub"].endswith("/v1")

"""template.yaml and the state machine: valid for CloudFormation, and every path ends the job."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import lint, lint_file  # type: ignore[import-untyped]
from cfnlint.decode.cfn_yaml import load as load_cfn_yaml  # type: ignore[import-untyped]

pytestmark = pytest.mark.unit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ASL_PATH = PROJECT_ROOT / "statemachine" / "tilefan.asl.json"
RETRIED_ERRORS = {
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "TransientError",
}
LONGEST_FUNCTION_TIMEOUT = 900
"""Lambda's limit, and the splitter's and merger's Timeout."""


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    document: dict[str, Any] = load_cfn_yaml(str(PROJECT_ROOT / "template.yaml"))
    return document


@pytest.fixture(scope="module")
def asl() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(ASL_PATH.read_text())
    return document


def substituted(template: dict[str, Any]) -> str:
    """The ASL text with each substitution replaced by a value of the kind it will have."""
    values = {
        "SplitterFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:Splitter",
        "TileWorkerFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:TileWorker",
        "MergerFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:Merger",
        "BucketName": "tilefan-bucket",
        "MaxConcurrency": str(template["Parameters"]["MaxConcurrency"]["Default"]),
        "TileWorkerReservedConcurrency": "100",
        "Partition": "aws",
    }
    return re.sub(r"\$\{(\w+)\}", lambda match: values[match.group(1)], ASL_PATH.read_text())


def tasks(states: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every Task state, including those inside Map item processors."""
    found: dict[str, dict[str, Any]] = {}
    for name, state in states.items():
        if state["Type"] == "Task":
            found[name] = state
        if "ItemProcessor" in state:
            found.update(tasks(state["ItemProcessor"]["States"]))
    return found


def test_template_passes_cfn_lint() -> None:
    assert [str(match) for match in lint_file(PROJECT_ROOT / "template.yaml")] == []


def test_state_machine_passes_cfn_lint_once_substituted(template: dict[str, Any]) -> None:
    # cfn-lint checks a state machine's definition when it is inline in a template.
    wrapper = {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Resources": {
            "Machine": {
                "Type": "AWS::StepFunctions::StateMachine",
                "Properties": {
                    "RoleArn": "arn:aws:iam::123456789012:role/tilefan",
                    "Definition": json.loads(substituted(template)),
                },
            }
        },
    }
    assert [str(match) for match in lint(json.dumps(wrapper))] == []


def test_substitutions_in_the_asl_are_exactly_those_the_template_provides(
    template: dict[str, Any],
) -> None:
    provided = template["Resources"]["TilefanStateMachine"]["Properties"]["DefinitionSubstitutions"]
    used = set(re.findall(r"\$\{(\w+)\}", ASL_PATH.read_text()))
    assert used == set(provided)


def test_max_concurrency_comes_from_the_execution_or_the_template(asl: dict[str, Any]) -> None:
    # JSON cannot hold an unquoted ${MaxConcurrency}, so the template's value is substituted
    # as text, turned into a number, and used only when the execution sets none.
    states = asl["States"]
    assert states["ProcessTiles"]["MaxConcurrencyPath"] == "$.max_concurrency"
    default = states["UseDefaultMaxConcurrency"]["Parameters"]["max_concurrency.$"]
    assert default == "States.StringToJson('${MaxConcurrency}')"


def test_max_concurrency_is_capped_at_the_tile_workers_reserved_concurrency(
    asl: dict[str, Any], template: dict[str, Any]
) -> None:
    states = asl["States"]
    # Both ways in (the execution's value and the template's default) pass through the cap.
    assert states["CheckMaxConcurrency"]["Choices"][0]["Next"] == "ReadConcurrencyCap"
    assert states["UseDefaultMaxConcurrency"]["Next"] == "ReadConcurrencyCap"
    cap = states["ReadConcurrencyCap"]["Parameters"]["max_concurrency.$"]
    assert cap == "States.StringToJson('${TileWorkerReservedConcurrency}')"
    [rule] = states["CapMaxConcurrency"]["Choices"]
    assert rule == {
        "Variable": "$.max_concurrency",
        "NumericGreaterThanPath": "$.cap.max_concurrency",
        "Next": "UseReservedConcurrency",
    }
    assert states["UseReservedConcurrency"]["Parameters"]["max_concurrency.$"] == (
        "$.cap.max_concurrency"
    )
    worker = template["Resources"]["TileWorkerFunction"]["Properties"]
    assert worker["ReservedConcurrentExecutions"] == {"Ref": "TileWorkerReservedConcurrency"}
    substitutions = template["Resources"]["TilefanStateMachine"]["Properties"][
        "DefinitionSubstitutions"
    ]
    assert substitutions["TileWorkerReservedConcurrency"] == {
        "Ref": "TileWorkerReservedConcurrency"
    }


def test_every_task_retries_transient_errors_with_jittered_backoff(asl: dict[str, Any]) -> None:
    all_tasks = tasks(asl["States"])
    assert set(all_tasks) == {
        "Split",
        "GatherBatch",
        "ReduceStatistics",
        "ProcessBatch",
        "CompactGroup",
        "Merge",
        "RemoveIntermediates",
        "Abort",
    }
    for name, state in all_tasks.items():
        retry, throttled = state["Retry"]
        assert set(retry["ErrorEquals"]) == RETRIED_ERRORS, name
        assert retry["BackoffRate"] == 2, name
        assert retry["JitterStrategy"] == "FULL", name
        assert 3 <= retry["MaxAttempts"] <= 6, name
        assert throttled["ErrorEquals"] == ["Lambda.TooManyRequestsException"], name


def _retry_budget(retry: dict[str, Any]) -> float:
    """Seconds of waiting the retrier allows before giving up, at the longest jitter."""
    waits = (
        min(retry["IntervalSeconds"] * retry["BackoffRate"] ** n, retry["MaxDelaySeconds"])
        for n in range(retry["MaxAttempts"])
    )
    return sum(waits)


def test_throttled_invocations_are_retried_for_many_minutes_not_seconds(
    asl: dict[str, Any],
) -> None:
    # The tile worker at its reserved concurrency is throttled by design when other jobs
    # hold it; with ToleratedFailurePercentage 0 a throttle that outlasts its retries would
    # fail the job. Each wait is capped, so the retries keep coming.
    for name, state in tasks(asl["States"]).items():
        throttled = state["Retry"][1]
        assert throttled["MaxAttempts"] >= 15, name
        assert throttled["MaxDelaySeconds"] <= 120, name
        assert throttled["JitterStrategy"] == "FULL", name
        assert _retry_budget(throttled) >= 10 * 60, name


def test_every_task_has_a_timeout_above_its_functions(asl: dict[str, Any]) -> None:
    # A Task without TimeoutSeconds waits a year for an invocation that Lambda lost.
    for name, state in tasks(asl["States"]).items():
        timeout = state["TimeoutSeconds"]
        assert LONGEST_FUNCTION_TIMEOUT < timeout <= LONGEST_FUNCTION_TIMEOUT + 120, name


def test_the_asl_names_no_partition(asl: dict[str, Any]) -> None:
    text = ASL_PATH.read_text()
    assert "arn:aws:" not in text
    resources = [state["Resource"] for state in tasks(asl["States"]).values()]
    for name in ("GatherStatistics", "ProcessTiles", "CompactLevels"):
        resources.append(asl["States"][name]["ItemReader"]["Resource"])
    assert all(resource.startswith("arn:${Partition}:states:::") for resource in resources)


def test_the_state_machine_name_fits_80_characters_whatever_the_stack_name(
    template: dict[str, Any],
) -> None:
    # A stack name may be 128 characters; the name is built from the stack's id instead.
    name = template["Resources"]["TilefanStateMachine"]["Properties"]["Name"]["Fn::Sub"]
    text, variables = name
    guid = "0" * 8 + "-" + "0" * 4 + "-" + "0" * 4 + "-" + "0" * 4 + "-" + "0" * 12
    assert variables == {
        "StackGuid": {"Fn::Select": [2, {"Fn::Split": ["/", {"Ref": "AWS::StackId"}]}]}
    }
    assert len(text.replace("${StackGuid}", guid)) <= 80
    assert "AWS::StackName" not in text


def test_every_failure_reaches_abort_and_then_fails(asl: dict[str, Any]) -> None:
    states = asl["States"]
    for name in (
        "Split",
        "GatherStatistics",
        "ReduceStatistics",
        "ProcessTiles",
        "CompactLevels",
        "Merge",
    ):
        [catch] = states[name]["Catch"]
        assert catch == {"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Abort"}
    assert states["Abort"]["Parameters"]["Payload"] == {
        "action": "abort",
        "job_id.$": "$.job_id",
        "error.$": "$.error",
    }
    assert states["Abort"]["Next"] == "JobFailed"
    assert states["Abort"]["Catch"][0]["Next"] == "JobFailed"
    assert states["JobFailed"]["Type"] == "Fail"


def test_every_path_through_the_state_machine_ends(asl: dict[str, Any]) -> None:
    states = asl["States"]

    def successors(state: dict[str, Any]) -> set[str]:
        following = {catch["Next"] for catch in state.get("Catch", [])}
        following |= {choice["Next"] for choice in state.get("Choices", [])}
        following |= {state[key] for key in ("Next", "Default") if key in state}
        return following

    reachable, frontier = set(), [asl["StartAt"]]
    while frontier:
        name = frontier.pop()
        if name not in reachable:
            reachable.add(name)
            frontier.extend(successors(states[name]))
    assert reachable == set(states)
    for name in reachable:
        state = states[name]
        ends = state["Type"] in ("Succeed", "Fail") or state.get("End") is True
        assert ends or successors(state), name
    terminal = {name for name in states if states[name]["Type"] in ("Succeed", "Fail")}
    assert terminal == {"JobSucceeded", "JobFailed"}


def test_distributed_map_reads_its_items_from_the_manifest(asl: dict[str, Any]) -> None:
    process = asl["States"]["ProcessTiles"]
    assert process["ItemProcessor"]["ProcessorConfig"] == {
        "Mode": "DISTRIBUTED",
        "ExecutionType": "STANDARD",
    }
    assert process["ItemReader"] == {
        "Resource": "arn:${Partition}:states:::s3:getObject",
        "ReaderConfig": {"InputType": "JSON"},
        "Parameters": {"Bucket": "${BucketName}", "Key.$": "$.split.manifest_key"},
    }
    assert process["ItemSelector"] == {"job_id.$": "$.job_id", "item.$": "$$.Map.Item.Value"}
    assert process["ResultPath"] is None
    assert process["ToleratedFailurePercentage"] == 0


def test_state_machine_role_may_run_its_own_distributed_map(template: dict[str, Any]) -> None:
    role = template["Resources"]["StateMachineRole"]["Properties"]
    statements = [
        statement
        for policy in role["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
    ]
    actions = {
        action
        for statement in statements
        for action in (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
    }
    assert {"states:StartExecution", "states:DescribeExecution", "states:StopExecution"} <= actions
    assert "lambda:InvokeFunction" in actions
    assert "s3:GetObject" in actions  # the ItemReader reads the manifest


def test_the_asl_file_is_what_the_template_deploys_and_the_engine_runs(
    template: dict[str, Any],
) -> None:
    from tilefan.local.engine import load_template

    properties = template["Resources"]["TilefanStateMachine"]["Properties"]
    assert (PROJECT_ROOT / properties["DefinitionUri"]).resolve() == ASL_PATH
    assert "Definition" not in properties  # one definition, in one file
    stack = load_template(PROJECT_ROOT)
    engine_values = {
        key: str(stack.resolve(value))
        for key, value in properties["DefinitionSubstitutions"].items()
    }
    expected = re.sub(
        r"\$\{(\w+)\}", lambda match: engine_values[match.group(1)], ASL_PATH.read_text()
    )
    assert json.loads(stack.state_machine_definition()) == json.loads(expected)

"""Least privilege: each role grants what its code calls, on the resources it calls it on.

The grants below are derived from the code (tilefan/service/, tilefan/stages/, tilefan/state/
and the handlers) and written out once more in docs/deploy.md. Any change to a role
changes this file, deliberately. The same rules run on the template after the SAM transform in
tests/integration/test_sam_build.py, so SAM cannot add a role or policy unseen.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode.cfn_yaml import load as load_cfn_yaml  # type: ignore[import-untyped]

pytestmark = pytest.mark.unit

PROJECT_ROOT = Path(__file__).resolve().parents[2]

BUCKET = "TilefanBucket.Arn"
UPLOADS = "${TilefanBucket.Arn}/uploads/*"
JOBS = "${TilefanBucket.Arn}/jobs/*"
RESULTS = "${TilefanBucket.Arn}/results/*"
TABLE = "JobsTable.Arn"
OWNER_INDEX = "${JobsTable.Arn}/index/owner-created"
STATES = "arn:${AWS::Partition}:states:${AWS::Region}:${AWS::AccountId}"
MACHINE = f"{STATES}:stateMachine:tilefan-${{StackGuid}}"
EXECUTIONS = f"{STATES}:execution:tilefan-${{StackGuid}}"
LAMBDA_XRAY = {"xray:PutTraceSegments": {"*"}, "xray:PutTelemetryRecords": {"*"}}


def _own_logs(log_group: str) -> dict[str, set[str]]:
    return {"logs:CreateLogStream": {log_group}, "logs:PutLogEvents": {log_group}}


# role -> action -> resources (intrinsics written as describe() prints them)
EXPECTED_GRANTS: dict[str, dict[str, set[str]]] = {
    "ApiFunctionRole": {
        **_own_logs("ApiFunctionLogGroup.Arn"),
        **LAMBDA_XRAY,
        "dynamodb:GetItem": {TABLE},
        "dynamodb:PutItem": {TABLE},
        "dynamodb:UpdateItem": {TABLE},
        "dynamodb:DeleteItem": {TABLE},
        "dynamodb:BatchGetItem": {TABLE},
        "dynamodb:Query": {OWNER_INDEX},
        "s3:PutObject": {UPLOADS},
        "s3:AbortMultipartUpload": {UPLOADS},
        "s3:GetObject": {UPLOADS, RESULTS},
        "s3:ListBucket": {BUCKET},
        "lambda:InvokeFunction": {"MergerFunction.Arn"},
        "states:StartExecution": {"Ref:TilefanStateMachine"},
        "states:StopExecution": {f"{STATES}:execution:${{TilefanStateMachine.Name}}:*"},
    },
    "SplitterFunctionRole": {
        **_own_logs("SplitterFunctionLogGroup.Arn"),
        **LAMBDA_XRAY,
        "dynamodb:GetItem": {TABLE},
        "dynamodb:UpdateItem": {TABLE},
        "dynamodb:BatchWriteItem": {TABLE},
        "s3:GetObject": {UPLOADS},
        # A tiff result's upload is opened for the workers; an ended job's is aborted.
        "s3:PutObject": {JOBS, RESULTS},
        "s3:AbortMultipartUpload": {JOBS, RESULTS},
        "s3:DeleteObject": {JOBS, RESULTS},
        "s3:ListBucket": {BUCKET},
        "s3:ListBucketMultipartUploads": {BUCKET},
    },
    "TileWorkerFunctionRole": {
        **_own_logs("TileWorkerFunctionLogGroup.Arn"),
        **LAMBDA_XRAY,
        "dynamodb:GetItem": {TABLE},
        "dynamodb:UpdateItem": {TABLE},
        "s3:GetObject": {JOBS, UPLOADS},
        # A COG's group of batches is joined by multipart upload under jobs/, aborted if
        # it fails (the second fan-out); a tiff batch's levels are copied into the result's
        # upload, aborted when the job ended.
        "s3:PutObject": {JOBS, RESULTS},
        "s3:AbortMultipartUpload": {JOBS, RESULTS},
        "s3:DeleteObject": {JOBS, RESULTS},
        "s3:ListBucket": {BUCKET},
        "s3:ListBucketMultipartUploads": {BUCKET},
    },
    "MergerFunctionRole": {
        **_own_logs("MergerFunctionLogGroup.Arn"),
        **LAMBDA_XRAY,
        "dynamodb:GetItem": {TABLE},
        "dynamodb:UpdateItem": {TABLE},
        "dynamodb:BatchGetItem": {TABLE},
        "dynamodb:BatchWriteItem": {TABLE},
        # A tiff result is assembled by multipart upload: UploadPartCopy reads its source
        # (GetObject on jobs/*) and, like CreateMultipartUpload, UploadPart and
        # CompleteMultipartUpload, is PutObject on the destination.
        "s3:GetObject": {JOBS},
        "s3:DeleteObject": {JOBS, RESULTS, UPLOADS},
        # The reduce of a statistics pass stores the combined statistics under jobs/, the
        # merge its coarse levels' groups.
        "s3:PutObject": {JOBS, RESULTS},
        "s3:AbortMultipartUpload": {RESULTS},
        # The workers' parts in a tiff result's upload, checked before it is completed.
        "s3:ListMultipartUploadParts": {RESULTS},
        "s3:ListBucket": {BUCKET},
        "s3:ListBucketMultipartUploads": {BUCKET},
    },
    "StateMachineRole": {
        "lambda:InvokeFunction": {
            "SplitterFunction.Arn",
            "TileWorkerFunction.Arn",
            "MergerFunction.Arn",
        },
        "s3:GetObject": {JOBS},
        "states:StartExecution": {MACHINE},
        "states:DescribeExecution": {f"{EXECUTIONS}:*", f"{EXECUTIONS}/*"},
        "states:StopExecution": {f"{EXECUTIONS}:*", f"{EXECUTIONS}/*"},
        **{
            f"logs:{action}": {"*"}
            for action in (
                "CreateLogDelivery",
                "GetLogDelivery",
                "UpdateLogDelivery",
                "DeleteLogDelivery",
                "ListLogDeliveries",
                "PutResourcePolicy",
                "DescribeResourcePolicies",
                "DescribeLogGroups",
            )
        },
        **{
            f"xray:{action}": {"*"}
            for action in (
                "PutTraceSegments",
                "PutTelemetryRecords",
                "GetSamplingRules",
                "GetSamplingTargets",
            )
        },
    },
}

# The only actions that may be granted on Resource "*", and why (also in docs/deploy.md).
_NO_XRAY_SCOPE = "X-Ray has no resource-level permissions"
_NO_DELIVERY_SCOPE = "CloudWatch Logs' vended log delivery has no resource-level permissions"
WILDCARD_ALLOW_LIST: dict[str, str] = {
    "xray:PutTraceSegments": _NO_XRAY_SCOPE,
    "xray:PutTelemetryRecords": _NO_XRAY_SCOPE,
    "xray:GetSamplingRules": _NO_XRAY_SCOPE,
    "xray:GetSamplingTargets": _NO_XRAY_SCOPE,
    "logs:CreateLogDelivery": _NO_DELIVERY_SCOPE,
    "logs:GetLogDelivery": _NO_DELIVERY_SCOPE,
    "logs:UpdateLogDelivery": _NO_DELIVERY_SCOPE,
    "logs:DeleteLogDelivery": _NO_DELIVERY_SCOPE,
    "logs:ListLogDeliveries": _NO_DELIVERY_SCOPE,
    "logs:PutResourcePolicy": "log delivery sets the log group's resource policy; no scope",
    "logs:DescribeResourcePolicies": "a list action with no resource scope",
    "logs:DescribeLogGroups": "a list action with no resource scope",
}
# Which roles may use the allow-list at all.
WILDCARD_ROLES = {
    "ApiFunctionRole",
    "SplitterFunctionRole",
    "TileWorkerFunctionRole",
    "MergerFunctionRole",
    "StateMachineRole",
}
OBJECT_PREFIXES = re.compile(r"^\$\{TilefanBucket\.Arn\}/(uploads|jobs|results)/\*$")
FUNCTION_ROLES = {
    "ApiFunction": "ApiFunctionRole",
    "SplitterFunction": "SplitterFunctionRole",
    "TileWorkerFunction": "TileWorkerFunctionRole",
    "MergerFunction": "MergerFunctionRole",
}


def load_template() -> dict[str, Any]:
    """template.yaml as cfn-lint reads it: intrinsics in their long form."""
    document: dict[str, Any] = load_cfn_yaml(str(PROJECT_ROOT / "template.yaml"))
    return document


def describe(value: Any) -> str:
    """A resource as text: ``Bucket.Arn``, ``Ref:Name``, a Sub's string, or the literal."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and len(value) == 1:
        ((key, argument),) = value.items()
        if key == "Fn::GetAtt":
            return argument if isinstance(argument, str) else ".".join(map(str, argument))
        if key == "Fn::Sub":
            return str(argument if isinstance(argument, str) else argument[0])
        if key == "Ref":
            return f"Ref:{argument}"
    raise AssertionError(f"cannot describe resource {value!r}")


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def role_grants(role: Mapping[str, Any]) -> dict[str, set[str]]:
    """Every Allow of a role's inline policies: action -> resources."""
    grants: defaultdict[str, set[str]] = defaultdict(set)
    for policy in role["Properties"].get("Policies", []):
        for statement in as_list(policy["PolicyDocument"]["Statement"]):
            assert statement["Effect"] == "Allow", statement
            assert "NotAction" not in statement and "NotResource" not in statement, statement
            for action in as_list(statement["Action"]):
                for resource in as_list(statement["Resource"]):
                    grants[str(action)].add(describe(resource))
    return dict(grants)


def least_privilege_problems(template: Mapping[str, Any]) -> list[str]:
    """Every breach of the rules in this file, as sentences; empty when the template keeps them.

    Works on template.yaml and on its SAM-transformed form alike.
    """
    problems: list[str] = []
    resources: Mapping[str, Any] = template["Resources"]
    # StackGuid: the stack id's last part, the state machine's name (template.yaml).
    names = set(resources) | {"AWS::StackName", "StackGuid"}
    roles = {lid: r for lid, r in resources.items() if r["Type"] == "AWS::IAM::Role"}
    if set(roles) != set(EXPECTED_GRANTS):
        problems.append(f"roles are {sorted(roles)}, expected {sorted(EXPECTED_GRANTS)}")
    for lid, resource in resources.items():
        if resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            problems.append(f"{lid}: a separate policy resource; grants belong in the roles")
    for lid, role in roles.items():
        properties = role["Properties"]
        if properties.get("ManagedPolicyArns"):
            problems.append(f"{lid}: managed policies {properties['ManagedPolicyArns']}")
        [trust] = as_list(properties["AssumeRolePolicyDocument"]["Statement"])
        if trust["Action"] != "sts:AssumeRole" or len(as_list(trust["Principal"]["Service"])) != 1:
            problems.append(f"{lid}: assumable by {trust['Principal']}")
        grants = role_grants(role)
        for action, granted in grants.items():
            if "*" in action:
                problems.append(f"{lid}: wildcard action {action}")
            for resource in granted:
                if resource == "*":
                    if action not in WILDCARD_ALLOW_LIST or lid not in WILDCARD_ROLES:
                        problems.append(f"{lid}: {action} on Resource '*'")
                elif "*" in resource:
                    scope = resource.split("*", 1)[0]
                    named = set(re.findall(r"\$\{([A-Za-z0-9:]+)(?:\.[A-Za-z]+)?\}", scope))
                    if not named & names:
                        problems.append(f"{lid}: {action} on {resource} names no resource of ours")
                    in_bucket = action.startswith("s3:") and resource.startswith("${TilefanBucket")
                    if in_bucket and not OBJECT_PREFIXES.match(resource):
                        problems.append(f"{lid}: {action} on {resource}: not one prefix")
        expected = EXPECTED_GRANTS.get(lid)
        if expected is not None and grants != expected:
            extra = {a: r - expected.get(a, set()) for a, r in grants.items()}
            missing = {a: r - grants.get(a, set()) for a, r in expected.items()}
            problems.append(
                f"{lid}: grants differ; extra { ({a: r for a, r in extra.items() if r}) }, "
                f"missing { ({a: r for a, r in missing.items() if r}) }"
            )
    return problems


def function_roles(template: Mapping[str, Any]) -> dict[str, str]:
    """Function logical id -> the logical id of its role (both SAM and plain Lambda)."""
    found = {}
    for lid, resource in template["Resources"].items():
        if resource["Type"] in ("AWS::Serverless::Function", "AWS::Lambda::Function"):
            role = resource["Properties"].get("Role")
            found[lid] = describe(role).removesuffix(".Arn") if role else "<generated by SAM>"
    return found


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def test_every_role_grants_only_what_its_code_calls(template: dict[str, Any]) -> None:
    assert least_privilege_problems(template) == []


def test_each_function_has_its_own_role(template: dict[str, Any]) -> None:
    assert function_roles(template) == FUNCTION_ROLES


def test_the_state_machine_has_its_role_and_only_it_assumes_it(template: dict[str, Any]) -> None:
    machine = template["Resources"]["TilefanStateMachine"]["Properties"]
    assert describe(machine["Role"]) == "StateMachineRole.Arn"
    assert "Policies" not in machine  # SAM would generate a second role from them
    trust = template["Resources"]["StateMachineRole"]["Properties"]["AssumeRolePolicyDocument"]
    [statement] = trust["Statement"]
    assert statement["Principal"] == {"Service": "states.amazonaws.com"}
    assert statement["Condition"] == {
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    }


def test_the_checker_catches_what_it_is_for(template: dict[str, Any]) -> None:
    # A wildcard resource, a wildcard action, a whole-bucket grant and a managed policy.
    import copy

    broken = copy.deepcopy(template)
    statements = broken["Resources"]["TileWorkerFunctionRole"]["Properties"]["Policies"][0]
    statements["PolicyDocument"]["Statement"] += [
        {"Effect": "Allow", "Action": "dynamodb:Scan", "Resource": "*"},
        {
            "Effect": "Allow",
            "Action": "s3:*",
            "Resource": {"Fn::Sub": "${TilefanBucket.Arn}/jobs/*"},
        },
        {
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": {"Fn::Sub": "${TilefanBucket.Arn}/*"},
        },
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*"},
    ]
    broken["Resources"]["MergerFunctionRole"]["Properties"]["ManagedPolicyArns"] = [
        "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
    ]
    problems = "\n".join(least_privilege_problems(broken))
    assert "dynamodb:Scan on Resource '*'" in problems
    assert "wildcard action s3:*" in problems
    assert "${TilefanBucket.Arn}/*: not one prefix" in problems
    assert "arn:aws:s3:::* names no resource of ours" in problems
    assert "MergerFunctionRole: managed policies" in problems


def test_the_deployment_guide_lists_every_grant() -> None:
    guide = (PROJECT_ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = guide.split("## What the template grants each function", 1)[1].split("\n## ", 1)[0]
    rows = {
        match.group(1): match.group(0)
        for match in re.finditer(r"^\| (\w+) \|.*$", section, flags=re.MULTILINE)
    }
    for role, grants in EXPECTED_GRANTS.items():
        subject = role.removesuffix("Role")
        assert subject in rows, f"docs/deploy.md has no row for {subject}"
        for action in grants:
            assert action.split(":", 1)[1] in rows[subject], f"{subject}: {action} not in the guide"
    for action in WILDCARD_ALLOW_LIST:
        assert action in section, f"the guide does not explain {action} on '*'"

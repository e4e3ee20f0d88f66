"""The embedded engine: the project's template, state machine and handlers on one machine.

S3, DynamoDB and Step Functions are moto's; every resource is built from ``template.yaml`` and
the ASL file it names, so the engine cannot drift from what is deployed. moto's Step Functions
interpreter runs the state machine; its Lambda tasks call ``lambda:Invoke`` through boto3, and
the engine answers those calls by running the template's handlers in this process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import types
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import boto3
import yaml  # type: ignore[import-untyped, unused-ignore]  # types-PyYAML is optional
from botocore.response import StreamingBody

__all__ = [
    "ACCOUNT_ID",
    "REGION",
    "EmbeddedEngine",
    "FunctionSpec",
    "LambdaContext",
    "LambdaHandler",
    "StackTemplate",
    "TemplateError",
    "load_template",
]

LOG = logging.getLogger(__name__)

REGION: Final = "us-east-1"
ACCOUNT_ID: Final = "123456789012"  # moto's default account
STACK_NAME: Final = "tilefan"
TEMPLATE_FILE: Final = "template.yaml"

LambdaHandler = Callable[[dict[str, Any], Any], Any]

_HANDLER_PACKAGE: Final = "tilefan_handlers"
_INVOKE_EVENT: Final = "before-call.lambda.Invoke"
_INVOKE_HOOK_ID: Final = "tilefan-embedded-engine-invoke"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_:.]+)\}")
_FAKE_CREDENTIALS: Final = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    # botocore's optional checksums make moto join each PUT body in quadratic time (a 60 MB
    # PUT took 5.2 s instead of 0.9 s); S3 itself checks what it needs.
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


class TemplateError(ValueError):
    """The template uses something the embedded engine cannot reproduce."""


# --- template ------------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]  # Any without stubs
    """A safe YAML loader that turns CloudFormation short-form tags into their long form."""


def _construct_intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    else:
        raise TemplateError(f"unexpected YAML node for !{tag_suffix}")
    if tag_suffix in ("Ref", "Condition"):
        return {tag_suffix: value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{tag_suffix}": value}


_CfnLoader.add_multi_constructor("!", _construct_intrinsic)


@dataclass(frozen=True)
class FunctionSpec:
    """One ``AWS::Serverless::Function`` with the template's Globals applied."""

    logical_id: str
    code_uri: Path
    handler: str
    memory_mb: int
    timeout_s: int
    environment: Mapping[str, Any]

    @property
    def arn(self) -> str:
        """The ARN the engine gives this function (its name is its logical id)."""
        return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{self.logical_id}"


@dataclass(frozen=True)
class StackTemplate:
    """The parts of ``template.yaml`` the engine reproduces, with physical names chosen."""

    root: Path
    parameters: Mapping[str, str]
    resources: Mapping[str, Mapping[str, Any]]
    functions: Mapping[str, FunctionSpec]
    bucket_id: str
    table_id: str
    state_machine_id: str

    def resolve(self, value: Any) -> Any:
        """Resolve the intrinsic functions in ``value`` against this stack."""
        return _Resolver(self).resolve(value)

    def physical_name(self, logical_id: str) -> str:
        """The name the engine gives a resource, as ``Ref`` returns it."""
        return _Resolver(self).ref(logical_id)

    @property
    def bucket_name(self) -> str:
        """Name of the template's bucket."""
        return self.physical_name(self.bucket_id)

    @property
    def table_name(self) -> str:
        """Name of the template's table."""
        return self.physical_name(self.table_id)

    @property
    def state_machine_name(self) -> str:
        """Name of the template's state machine."""
        props = self.resources[self.state_machine_id].get("Properties", {})
        if "Name" in props:
            return str(self.resolve(props["Name"]))
        return f"{STACK_NAME}-{self.state_machine_id}"

    @property
    def state_machine_arn(self) -> str:
        """ARN of the template's state machine."""
        return f"arn:aws:states:{REGION}:{ACCOUNT_ID}:stateMachine:{self.state_machine_name}"

    def state_machine_definition(self) -> str:
        """The ASL text with the template's DefinitionSubstitutions applied."""
        props = self.resources[self.state_machine_id]["Properties"]
        if "DefinitionUri" in props:
            uri = props["DefinitionUri"]
            if not isinstance(uri, str):
                raise TemplateError("DefinitionUri must be a local path for the embedded engine")
            text = (self.root / uri).read_text(encoding="utf-8")
        elif "Definition" in props:
            text = json.dumps(props["Definition"])
        else:
            raise TemplateError(f"{self.state_machine_id} has no Definition or DefinitionUri")
        substitutions = {
            key: _as_text(self.resolve(value))
            for key, value in props.get("DefinitionSubstitutions", {}).items()
        }

        def substitute(match: re.Match[str]) -> str:
            key = match.group(1)
            if key not in substitutions:
                raise TemplateError(f"no DefinitionSubstitutions entry for ${{{key}}}")
            return substitutions[key]

        definition = _PLACEHOLDER.sub(substitute, text)
        json.loads(definition)  # fail here, not inside moto, if substitution broke the JSON
        return definition

    def environment(self) -> dict[str, str]:
        """Every function's environment variables, resolved and merged.

        The handlers share one process, hence one ``os.environ``: a variable that two functions
        set to different values cannot be reproduced, and is refused.
        """
        merged: dict[str, str] = {}
        for spec in self.functions.values():
            for name, value in spec.environment.items():
                text = _as_text(self.resolve(value))
                if merged.setdefault(name, text) != text:
                    raise TemplateError(f"functions disagree on environment variable {name}")
        return merged

    def setting_variables(self) -> frozenset[str]:
        """Environment variables whose value is a setting: a literal or a parameter.

        The others name the stack's resources (``!Ref TilefanBucket``) and are always the
        engine's. A setting already in the process environment is left as it is, as
        ``parameters=`` overrides a parameter: a benchmark or test that sets
        ``TILEFAN_TILES_PER_ITEM`` before starting an engine gets its value.
        """
        settings: set[str] = set()
        for spec in self.functions.values():
            for name, value in spec.environment.items():
                if not isinstance(value, dict) or (
                    set(value) == {"Ref"} and value["Ref"] in self.parameters
                ):
                    settings.add(name)
        return frozenset(settings)


def load_template(project_root: Path, parameters: Mapping[str, str] | None = None) -> StackTemplate:
    """Read ``template.yaml`` under ``project_root``; ``parameters`` override its defaults."""
    path = project_root / TEMPLATE_FILE
    document = yaml.load(path.read_text(encoding="utf-8"), Loader=_CfnLoader)
    if not isinstance(document, dict) or "Resources" not in document:
        raise TemplateError(f"{path} is not a CloudFormation template")
    resources: dict[str, dict[str, Any]] = document["Resources"]

    values: dict[str, str] = {}
    for name, declaration in document.get("Parameters", {}).items():
        if "Default" in declaration:
            values[name] = _as_text(declaration["Default"])
    for name, value in (parameters or {}).items():
        if name not in document.get("Parameters", {}):
            raise TemplateError(f"template has no parameter {name}")
        values[name] = value

    globals_ = document.get("Globals", {}).get("Function", {})
    functions = {
        logical_id: _function_spec(project_root, logical_id, resource, globals_, values)
        for logical_id, resource in resources.items()
        if resource.get("Type") == "AWS::Serverless::Function"
    }
    return StackTemplate(
        root=project_root,
        parameters=values,
        resources=resources,
        functions=functions,
        bucket_id=_single(resources, "AWS::S3::Bucket"),
        table_id=_single(resources, "AWS::DynamoDB::Table"),
        state_machine_id=_single(resources, "AWS::Serverless::StateMachine"),
    )


def _single(resources: Mapping[str, Mapping[str, Any]], resource_type: str) -> str:
    found = [lid for lid, res in resources.items() if res.get("Type") == resource_type]
    if len(found) != 1:
        raise TemplateError(f"expected one {resource_type}, found {len(found)}")
    return found[0]


def _function_spec(
    root: Path,
    logical_id: str,
    resource: Mapping[str, Any],
    globals_: Mapping[str, Any],
    parameters: Mapping[str, str],
) -> FunctionSpec:
    props = resource.get("Properties", {})

    def setting(name: str, default: Any) -> Any:
        value = props.get(name, globals_.get(name, default))
        if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in parameters:
            return parameters[value["Ref"]]  # MemorySize: !Ref TileWorkerMemorySize
        return value

    environment = {
        **globals_.get("Environment", {}).get("Variables", {}),
        **props.get("Environment", {}).get("Variables", {}),
    }
    code_uri = setting("CodeUri", None)
    if not isinstance(code_uri, str):
        raise TemplateError(f"{logical_id}: CodeUri must be a local path")
    return FunctionSpec(
        logical_id=logical_id,
        code_uri=root / code_uri,
        handler=str(setting("Handler", "app.lambda_handler")),
        memory_mb=int(setting("MemorySize", 128)),
        timeout_s=int(setting("Timeout", 3)),
        environment=environment,
    )


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise TemplateError(f"expected a scalar, got {value!r}")


class _Resolver:
    """Evaluates the intrinsic functions the template uses, as CloudFormation would here."""

    def __init__(self, stack: StackTemplate) -> None:
        self._stack = stack

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, argument), *_ = value.items()
            if key == "Ref":
                return self.ref(str(argument))
            if key == "Fn::GetAtt":
                logical_id, attribute = argument
                return self.get_att(str(logical_id), str(attribute))
            if key == "Fn::Sub":
                return self.sub(argument)
            if key == "Fn::Join":
                delimiter, parts = argument
                return str(delimiter).join(_as_text(self.resolve(part)) for part in parts)
            if key.startswith("Fn::"):
                raise TemplateError(f"the embedded engine does not evaluate {key}")
        return {name: self.resolve(item) for name, item in value.items()}

    def ref(self, name: str) -> str:
        stack = self._stack
        pseudo = {
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::StackName": STACK_NAME,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        }
        if name in pseudo:
            return pseudo[name]
        if name in stack.parameters:
            return stack.parameters[name]
        resource_type = stack.resources.get(name, {}).get("Type")
        if resource_type == "AWS::S3::Bucket":
            return f"{STACK_NAME}-{name}".lower()
        if resource_type == "AWS::DynamoDB::Table":
            return f"{STACK_NAME}-{name}"
        if resource_type == "AWS::Serverless::Function":
            return name
        if resource_type == "AWS::Serverless::StateMachine":
            return stack.state_machine_arn
        if resource_type == "AWS::Serverless::LayerVersion":
            return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:layer:{name}:1"
        raise TemplateError(f"cannot Ref {name}")

    def get_att(self, logical_id: str, attribute: str) -> str:
        stack = self._stack
        if logical_id in stack.functions and attribute == "Arn":
            return stack.functions[logical_id].arn
        if logical_id == stack.state_machine_id and attribute == "Name":
            return stack.state_machine_name
        if logical_id == stack.state_machine_id and attribute == "Arn":
            return stack.state_machine_arn
        if logical_id == stack.bucket_id and attribute == "Arn":
            return f"arn:aws:s3:::{stack.bucket_name}"
        if logical_id == stack.table_id and attribute == "Arn":
            return f"arn:aws:dynamodb:{REGION}:{ACCOUNT_ID}:table/{stack.table_name}"
        raise TemplateError(f"cannot GetAtt {logical_id}.{attribute}")

    def sub(self, argument: Any) -> str:
        if isinstance(argument, list):
            template, variables = argument
            local = {name: _as_text(self.resolve(v)) for name, v in variables.items()}
        else:
            template, local = argument, {}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in local:
                return local[name]
            if "." in name and not name.startswith("AWS::"):
                logical_id, attribute = name.split(".", 1)
                return self.get_att(logical_id, attribute)
            return self.ref(name)

        return _PLACEHOLDER.sub(replace, str(template))


# --- Lambda in-process ---------------------------------------------------------------------


@dataclass
class LambdaContext:
    """The parts of the Lambda context object that handlers and Powertools read."""

    function_name: str
    invoked_function_arn: str = ""  # the engine's ARN for function_name when left empty
    memory_limit_in_mb: int = 128
    timeout_s: int = 3
    function_version: str = "$LATEST"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if not self.invoked_function_arn:
            self.invoked_function_arn = (
                f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{self.function_name}"
            )

    @property
    def log_group_name(self) -> str:
        """Where Lambda would send this function's logs."""
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        """A log stream name of Lambda's shape."""
        return f"embedded/[{self.function_version}]{self.aws_request_id}"

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the function's Timeout (not enforced by the engine)."""
        elapsed = time.monotonic() - self.started_at
        return max(0, int((self.timeout_s - elapsed) * 1000))


class _LambdaFunction:
    """One template function: its handler, loaded on first use, and how to invoke it."""

    def __init__(self, spec: FunctionSpec, handler: LambdaHandler | None) -> None:
        self.spec = spec
        self._handler = handler
        self._load_lock = threading.Lock()
        self.module_name: str | None = None

    def handler(self) -> LambdaHandler:
        # Loaded lazily: a test that injects some handlers need not have the others' code.
        with self._load_lock:
            if self._handler is None:
                self._handler = self._load()
            return self._handler

    def _load(self) -> LambdaHandler:
        module_file, _, attribute = self.spec.handler.rpartition(".")
        path = self.spec.code_uri / f"{module_file.replace('.', '/')}.py"
        name = f"{_HANDLER_PACKAGE}.{self.spec.logical_id}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None or not path.is_file():
            raise FileNotFoundError(f"{self.spec.logical_id}: no handler module at {path}")
        sys.modules.setdefault(_HANDLER_PACKAGE, types.ModuleType(_HANDLER_PACKAGE))
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and typing look modules up while executing
        self.module_name = name
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        handler: LambdaHandler = getattr(module, attribute)
        return handler

    def unload(self) -> None:
        """Forget a loaded handler module, so the next engine loads it afresh."""
        with self._load_lock:
            if self.module_name is not None:
                sys.modules.pop(self.module_name, None)
                self._handler = None
                self.module_name = None

    def invoke(self, payload: bytes) -> tuple[bytes, str | None]:
        """Run the handler on a JSON payload; returns the response payload and FunctionError."""
        context = LambdaContext(
            function_name=self.spec.logical_id,
            invoked_function_arn=self.spec.arn,
            memory_limit_in_mb=self.spec.memory_mb,
            timeout_s=self.spec.timeout_s,
        )
        try:
            event = json.loads(payload or b"{}")
            result = self.handler()(event, context)
        except Exception as exc:
            LOG.info("%s raised %s: %s", self.spec.logical_id, type(exc).__name__, exc)
            # Lambda's error shape: Step Functions takes the error name from errorType.
            error = {
                "errorMessage": str(exc),
                "errorType": type(exc).__name__,
                "requestId": context.aws_request_id,
                "stackTrace": traceback.format_tb(exc.__traceback__),
            }
            return json.dumps(error).encode(), "Unhandled"
        try:
            return json.dumps(result).encode(), None
        except (TypeError, ValueError) as exc:
            error = {
                "errorMessage": f"Unable to marshal response: {exc}",
                "errorType": "Runtime.MarshalError",
                "requestId": context.aws_request_id,
            }
            return json.dumps(error).encode(), "Unhandled"


@dataclass(frozen=True)
class _HttpResponse:
    """What botocore reads of the HTTP response when a before-call handler answers."""

    status_code: int
    headers: Mapping[str, str] = field(default_factory=dict)


class _LambdaService:
    """Answers ``lambda:Invoke`` from a botocore ``before-call`` hook, in this process."""

    def __init__(self, functions: Mapping[str, _LambdaFunction]) -> None:
        self._functions = functions

    def __call__(self, params: Mapping[str, Any], **_: Any) -> tuple[_HttpResponse, dict[str, Any]]:
        request_id = str(uuid.uuid4())
        metadata = {"RequestId": request_id, "HTTPHeaders": {}, "RetryAttempts": 0}
        function = self._functions.get(_function_name(str(params["url_path"])))
        if function is None:
            error = {
                "Error": {"Code": "ResourceNotFoundException", "Message": "Function not found"},
                "ResponseMetadata": {**metadata, "HTTPStatusCode": 404},
            }
            return _HttpResponse(404), error
        body = params.get("body") or b""
        payload = body.encode() if isinstance(body, str) else bytes(body)
        headers = params.get("headers", {})
        if headers.get("X-Amz-Invocation-Type") == "Event":
            threading.Thread(target=function.invoke, args=(payload,), daemon=True).start()
            response: dict[str, Any] = {"StatusCode": 202, "Payload": _body(b"")}
        else:
            result, function_error = function.invoke(payload)
            response = {"StatusCode": 200, "ExecutedVersion": "$LATEST", "Payload": _body(result)}
            if function_error is not None:
                response["FunctionError"] = function_error
        response["ResponseMetadata"] = {**metadata, "HTTPStatusCode": response["StatusCode"]}
        return _HttpResponse(response["StatusCode"]), response


def _function_name(url_path: str) -> str:
    # /2015-03-31/functions/<name or ARN, URL-encoded>/invocations
    quoted = url_path.split("/functions/", 1)[1].split("/", 1)[0]
    name = urllib.parse.unquote(quoted)
    if name.startswith("arn:"):
        name = name.split(":function:", 1)[1]
    return name.split(":", 1)[0]  # drop a qualifier


def _body(data: bytes) -> StreamingBody:
    return StreamingBody(io.BytesIO(data), len(data))


# --- moto ----------------------------------------------------------------------------------


class _MotoPatches:
    """Changes to moto that the engine makes while it runs, and takes back when it stops.

    - moto 5.2.5 counts a failed Distributed Map item and carries on: the Map succeeds
      whatever fails, and ToleratedFailureCount/Percentage are ignored. AWS fails the Map with
      ``States.ExceedToleratedFailureThreshold`` once failures pass the threshold (0 by
      default); the engine applies the same rule when the Map Run ends.
    - moto lets a task that fails after StopExecution turn the stopped execution FAILED. On AWS
      a stopped execution ends ABORTED whatever its task in flight answers; so it does here.
    - moto's DynamoDB backend reads and writes items without a lock, so concurrent ``ADD``
      updates lose increments. One process-wide lock around each request's dispatch makes
      every request atomic, as DynamoDB's single-item operations are.
    - moto's interpreter builds a new boto3 Lambda client for every task (about 9 ms) and
      re-parses every JSONPath with a freshly built parser (about 1 ms each). Reusing one
      client (boto3 clients are thread-safe) and caching parsed paths cuts the CPU cost of a
      Distributed Map item about fourfold (``benchmarks/engine_overhead.py``). Both are
      optimisations: if moto moves them, they are skipped.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._lambda_clients: dict[str, Any] = {}
        self._lambda_clients_lock = threading.Lock()

    def install(self) -> None:
        """Apply every change."""
        self._serialise_dynamodb()
        self._install_failure_threshold()
        self._keep_stops()
        self._install_speedups()

    def _serialise_dynamodb(self) -> None:
        from moto.dynamodb.responses import DynamoHandler

        request_lock = threading.RLock()
        original_call_action = DynamoHandler.call_action

        def call_action(handler: Any) -> Any:
            with request_lock:
                return original_call_action(handler)

        self._replace(DynamoHandler, "call_action", call_action)

    def _keep_stops(self) -> None:
        try:
            environment = _interpreter_module("asl.eval.environment")
            program_state = _interpreter_module("asl.eval.program_state")
        except ImportError:  # pragma: no cover - depends on moto's internals
            LOG.warning("moto's interpreter moved: a stopped execution may end FAILED")
            return
        original_set_error = environment.Environment.set_error

        def set_error(env: Any, error: Any) -> None:
            if not isinstance(env.program_state(), program_state.ProgramStopped):
                original_set_error(env, error)

        self._replace(environment.Environment, "set_error", set_error)

    def _install_speedups(self) -> None:
        try:
            from moto.stepfunctions.parser.asl.component.state.exec.state_task import (
                lambda_eval_utils,
            )
            from moto.stepfunctions.parser.asl.utils import json_path
        except ImportError:  # pragma: no cover - only the optimisations depend on these paths
            LOG.debug("moto's interpreter moved; running without the engine's speed-ups")
            return
        original_client_for = getattr(lambda_eval_utils, "boto_client_for", None)
        if callable(original_client_for):

            def boto_client_for(region: str, service: str, state_credentials: Any = None) -> Any:
                if service != "lambda":
                    return original_client_for(
                        region=region, service=service, state_credentials=state_credentials
                    )
                with self._lambda_clients_lock:
                    if region not in self._lambda_clients:
                        self._lambda_clients[region] = original_client_for(
                            region=region, service=service, state_credentials=state_credentials
                        )
                    return self._lambda_clients[region]

            self._replace(lambda_eval_utils, "boto_client_for", boto_client_for)
        original_parse = getattr(json_path, "parse", None)
        if callable(original_parse):
            self._replace(json_path, "parse", functools.lru_cache(maxsize=4096)(original_parse))

    def _install_failure_threshold(self) -> None:
        try:
            api = _interpreter_module("api")
            failure = _interpreter_module("asl.component.common.error_name.failure_event")
            names = _interpreter_module("asl.component.common.error_name.states_error_name")
            name_types = _interpreter_module(
                "asl.component.common.error_name.states_error_name_type"
            )
            distributed = _interpreter_module(
                "asl.component.state.exec.state_map.iteration.distributed_iteration_component"
            )
            event_detail = _interpreter_module("asl.eval.event.event_detail")
        except ImportError:  # pragma: no cover - depends on moto's internals
            LOG.warning("moto's interpreter moved: a failed Map item will not fail the Map")
            return
        component_class = distributed.DistributedIterationComponent
        original_map_run = component_class._map_run
        threshold = name_types.StatesErrorNameType.StatesExceedToleratedFailureThreshold
        error_name = names.StatesErrorName(typ=threshold)

        def map_run(component: Any, env: Any, eval_input: Any) -> None:
            original_map_run(component, env, eval_input)
            if not env.is_running():
                return  # stopped: its items ended as stopped, not failed, and so does it
            record = eval_input.map_run_record
            total = record.item_counter.total.get()
            failed = record.item_counter.failed.get() + record.item_counter.timed_out.get()
            if failed <= record.tolerated_failure_count and (
                total == 0 or 100 * failed / total <= record.tolerated_failure_percentage
            ):
                return
            env.stack.pop()  # the results the run pushed; the state fails instead
            cause = (
                "The specified tolerated failure threshold was exceeded: "
                f"{failed} of {total} items failed"
            )
            details = api.MapRunFailedEventDetails(error=error_name.error_name, cause=cause)
            raise failure.FailureEventException(
                failure_event=failure.FailureEvent(
                    env=env,
                    error_name=error_name,
                    event_type=api.HistoryEventType.MapRunFailed,
                    event_details=event_detail.EventDetails(mapRunFailedEventDetails=details),
                )
            )

        self._replace(component_class, "_map_run", map_run)

    def _replace(self, owner: Any, name: str, value: Any) -> None:
        original = getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, original))

    def uninstall(self) -> None:
        """Take every change back, newest first."""
        while self._undo:
            self._undo.pop()()
        self._lambda_clients.clear()


class _KeepPutBodies:
    """WSGI middleware: a PUT body reaches moto whatever its Content-Type says.

    werkzeug parses an ``application/x-www-form-urlencoded`` body as a form, and moto then
    stores an empty object (urllib sends that type by default). S3 stores the bytes as they
    are, so such a PUT is handed on as ``application/octet-stream``.
    """

    def __init__(self, app: WSGIApplication) -> None:
        self._app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        content_type = str(environ.get("CONTENT_TYPE", ""))
        if environ.get("REQUEST_METHOD") == "PUT" and content_type.startswith(
            "application/x-www-form-urlencoded"
        ):
            environ["CONTENT_TYPE"] = "application/octet-stream"
        return self._app(environ, start_response)


def _moto_server(host: str, port: int) -> Any:
    """moto's ThreadedMotoServer, with its WSGI application wrapped in ``_KeepPutBodies``."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class MotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            # As ThreadedMotoServer._server_entry, with the middleware around the app.
            app = _KeepPutBodies(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return MotoServer(ip_address=host, port=port, verbose=False)


def _interpreter_module(name: str) -> types.ModuleType:
    return importlib.import_module(f"moto.stepfunctions.parser.{name}")


class _Environment:
    """Sets environment variables and puts the previous values back."""

    def __init__(self) -> None:
        self._saved: dict[str, str | None] = {}

    def set(self, name: str, value: str | None) -> None:
        self._saved.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def restore(self) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved.clear()


_ACTIVE_LOCK = threading.Lock()
_active_engine: EmbeddedEngine | None = None


class EmbeddedEngine:
    """S3, DynamoDB and Step Functions on moto, with the template's Lambda handlers run in-process.

    ``server=False`` patches botocore in this process (moto's ``mock_aws``); ``server=True``
    starts moto's threaded HTTP server on ``host:port`` (0 picks a free port), so presigned URLs
    work from any HTTP client on this machine. ``handlers`` maps a function's logical id to a
    handler used instead of the one its CodeUri and Handler name. ``parameters`` override the
    template's parameter defaults.
    """

    bucket: str
    table: str
    state_machine_arn: str
    endpoint_url: str | None

    def __init__(
        self,
        project_root: Path | None = None,
        *,
        server: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        handlers: Mapping[str, LambdaHandler] | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> None:
        self.project_root = (project_root or Path(__file__).resolve().parent.parent).resolve()
        self.template = load_template(self.project_root, parameters)
        unknown = set(handlers or {}) - set(self.template.functions)
        if unknown:
            raise ValueError(f"no such functions in the template: {sorted(unknown)}")
        self._functions = {
            logical_id: _LambdaFunction(spec, (handlers or {}).get(logical_id))
            for logical_id, spec in self.template.functions.items()
        }
        self._server_mode = server
        self._host = host
        self._port = port
        self.bucket = self.template.bucket_name
        self.table = self.template.table_name
        self.state_machine_arn = self.template.state_machine_arn
        self.endpoint_url = None
        self._env = _Environment()
        self._mock: Any = None
        self._server: Any = None
        self._session: boto3.Session | None = None
        self._saved_default_session: boto3.Session | None = None
        self._hooked_default_session = False
        self._saved_sfn_config: Any = None
        self._saved_werkzeug_level = logging.NOTSET
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self._sys_path: list[str] = []
        self._patches = _MotoPatches()

    # -- lifecycle --

    def __enter__(self) -> EmbeddedEngine:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop()

    def _start(self) -> None:
        global _active_engine
        # moto's backends, boto3's default session and os.environ are process-wide.
        with _ACTIVE_LOCK:
            if _active_engine is not None:
                raise RuntimeError("another EmbeddedEngine is running in this process")
            _active_engine = self
        for name, value in _FAKE_CREDENTIALS.items():
            self._env.set(name, value)
        # The interpreter logs its own parse notes and every JSONPath miss (a Choice's
        # IsPresent test included) at warning or error level; a job's real failures are in
        # the execution's history and the job record, so users are not shown these.
        logging.getLogger("moto.stepfunctions.parser").setLevel(logging.CRITICAL)
        settings = self.template.setting_variables()
        for name, value in self.template.environment().items():
            if name in settings and name in os.environ:
                continue  # the caller's setting beats the template's default
            self._env.set(name, value)
        if self._server_mode:
            self._start_server()
        else:
            from moto import mock_aws

            # A custom endpoint would bypass moto's patching and reach the network.
            self._env.set("AWS_ENDPOINT_URL", None)
            self._mock = mock_aws(config={"stepfunctions": {"execute_state_machine": True}})
            self._mock.start()
        self._patches.install()
        self._install_invoke_hook()
        self._session = boto3.Session(region_name=REGION)
        for spec in self.template.functions.values():
            code_dir = str(spec.code_uri)
            if code_dir not in sys.path:  # as on Lambda, a handler imports its siblings
                sys.path.append(code_dir)
                self._sys_path.append(code_dir)
        self._create_resources()

    def _start_server(self) -> None:
        from moto.core.config import default_user_config

        # werkzeug logs every request at INFO; a Distributed Map makes thousands.
        werkzeug_log = logging.getLogger("werkzeug")
        self._saved_werkzeug_level = werkzeug_log.level
        werkzeug_log.setLevel(max(werkzeug_log.getEffectiveLevel(), logging.WARNING))
        self._server = _moto_server(self._host, self._port)
        self._server.start()
        host, port = self._server.get_host_and_port()
        url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.endpoint_url = f"http://{url_host}:{port}"
        self._env.set("AWS_ENDPOINT_URL", self.endpoint_url)
        # moto's interpreter reaches its own server (the ItemReader's getObject) on
        # localhost:MOTO_PORT.
        self._env.set("MOTO_PORT", str(port))
        self._post(f"{self.endpoint_url}/moto-api/reset", {})
        self._saved_sfn_config = default_user_config.get("stepfunctions")
        self._post(
            f"{self.endpoint_url}/moto-api/config",
            {"stepfunctions": {"execute_state_machine": True}},
        )

    @staticmethod
    def _post(url: str, body: Mapping[str, Any]) -> None:
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def _install_invoke_hook(self) -> None:
        # moto's interpreter calls boto3.client("lambda", ...), which uses boto3's default
        # session; a before-call handler there answers Invoke before anything is sent.
        self._saved_default_session = boto3.DEFAULT_SESSION
        self._hooked_default_session = True
        boto3.setup_default_session(region_name=REGION)
        session = boto3.DEFAULT_SESSION
        assert session is not None
        # botocore's stubs type every handler as returning None; a before-call handler may
        # return (http_response, parsed_response) to stand in for the request.
        hook = cast(Callable[..., None], _LambdaService(self._functions))
        session.events.register(_INVOKE_EVENT, hook, unique_id=_INVOKE_HOOK_ID)
        # Build the session's shared components once, before worker threads race to.
        session.client("lambda", region_name=REGION)

    def _create_resources(self) -> None:
        resources = self.template.resources
        bucket_props = self.template.resolve(
            resources[self.template.bucket_id].get("Properties", {})
        )
        s3 = self.client("s3")
        s3.create_bucket(Bucket=self.bucket)
        if "PublicAccessBlockConfiguration" in bucket_props:
            s3.put_public_access_block(
                Bucket=self.bucket,
                PublicAccessBlockConfiguration=bucket_props["PublicAccessBlockConfiguration"],
            )
        encryption = bucket_props.get("BucketEncryption", {}).get(
            "ServerSideEncryptionConfiguration"
        )
        if encryption:
            rules = [
                {
                    "ApplyServerSideEncryptionByDefault": rule["ServerSideEncryptionByDefault"],
                    **(
                        {"BucketKeyEnabled": rule["BucketKeyEnabled"]}
                        if "BucketKeyEnabled" in rule
                        else {}
                    ),
                }
                for rule in encryption
            ]
            s3.put_bucket_encryption(
                Bucket=self.bucket, ServerSideEncryptionConfiguration={"Rules": rules}
            )

        table_props = self.template.resolve(resources[self.template.table_id]["Properties"])
        dynamodb = self.client("dynamodb")
        create: dict[str, Any] = {
            "TableName": self.table,
            "KeySchema": table_props["KeySchema"],
            "AttributeDefinitions": table_props["AttributeDefinitions"],
            "BillingMode": table_props.get("BillingMode", "PROVISIONED"),
        }
        for optional in (
            "GlobalSecondaryIndexes",
            "LocalSecondaryIndexes",
            "ProvisionedThroughput",
        ):
            if optional in table_props:
                create[optional] = table_props[optional]
        dynamodb.create_table(**create)
        ttl = table_props.get("TimeToLiveSpecification")
        if ttl:
            dynamodb.update_time_to_live(TableName=self.table, TimeToLiveSpecification=ttl)

        machine_props = resources[self.template.state_machine_id]["Properties"]
        created = self.client("stepfunctions").create_state_machine(
            name=self.template.state_machine_name,
            definition=self.template.state_machine_definition(),
            roleArn=f"arn:aws:iam::{ACCOUNT_ID}:role/{self.template.state_machine_id}Role",
            type=str(machine_props.get("Type", "STANDARD")),
        )
        if created["stateMachineArn"] != self.state_machine_arn:
            raise RuntimeError(f"unexpected state machine ARN {created['stateMachineArn']}")

    def _stop(self) -> None:
        global _active_engine
        with _ACTIVE_LOCK:
            if _active_engine is not self:
                return
        try:
            self._teardown()
        finally:
            with _ACTIVE_LOCK:
                _active_engine = None

    def _teardown(self) -> None:
        if self._session is not None:
            self._stop_running_executions()
        if self._hooked_default_session:
            hooked = boto3.DEFAULT_SESSION
            if hooked is not None:
                hooked.events.unregister(_INVOKE_EVENT, unique_id=_INVOKE_HOOK_ID)
            if self._mock is None:  # mock_aws puts back boto3's default session itself
                boto3.DEFAULT_SESSION = self._saved_default_session
            self._hooked_default_session = False
            self._saved_default_session = None
        if self._mock is not None:
            self._mock.stop()
            self._mock = None
        if self._server is not None:
            from moto.core.config import default_user_config

            if self._saved_sfn_config is not None:
                default_user_config["stepfunctions"] = self._saved_sfn_config
            self._server.stop()
            self._server = None
            logging.getLogger("werkzeug").setLevel(self._saved_werkzeug_level)
        self._patches.uninstall()
        for function in self._functions.values():
            function.unload()
        for code_dir in self._sys_path:
            if code_dir in sys.path:
                sys.path.remove(code_dir)
        self._sys_path.clear()
        self._clients.clear()
        self._session = None
        self._env.restore()

    def _stop_running_executions(self) -> None:
        # Executions run in daemon threads; stop them before their AWS stand-ins go away.
        try:
            sfn = self.client("stepfunctions")
            running = sfn.list_executions(
                stateMachineArn=self.state_machine_arn, statusFilter="RUNNING"
            )["executions"]
            for execution in running:
                sfn.stop_execution(executionArn=execution["executionArn"], error="EngineStopped")
        except Exception:  # the engine is closing; nothing here may mask the real error
            LOG.warning("could not stop running executions", exc_info=True)

    # -- use --

    def handler(self, logical_id: str) -> LambdaHandler:
        """The handler the engine runs for a template function (loaded on first use)."""
        if self._session is None:
            raise RuntimeError("the engine is not running; use it as a context manager")
        if logical_id not in self._functions:
            raise KeyError(f"no function {logical_id} in the template")
        return self._functions[logical_id].handler()

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` bound to the engine (created once, thread-safe)."""
        if self._session is None:
            raise RuntimeError("the engine is not running; use it as a context manager")
        with self._clients_lock:
            if service not in self._clients:
                # boto3's stubs only accept literal service names.
                make_client: Callable[..., Any] = self._session.client
                self._clients[service] = make_client(
                    service, region_name=REGION, endpoint_url=self.endpoint_url
                )
            return self._clients[service]

    def start_job(self, job_id: str, *, max_concurrency: int) -> str:
        """Start the state machine on a job; returns the execution ARN."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        # moto names an unnamed execution "None", so a second one would clash; name it after
        # the job (Step Functions allows 80 characters of [A-Za-z0-9_-]).
        prefix = re.sub(r"[^A-Za-z0-9_-]", "_", job_id)[:47]
        started = self.client("stepfunctions").start_execution(
            stateMachineArn=self.state_machine_arn,
            name=f"{prefix}-{uuid.uuid4().hex}",
            input=json.dumps({"job_id": job_id, "max_concurrency": max_concurrency}),
        )
        execution_arn: str = started["executionArn"]
        return execution_arn

    def wait(self, execution_arn: str, *, timeout: float) -> dict[str, Any]:
        """Poll until the execution ends; returns its DescribeExecution answer."""
        sfn = self.client("stepfunctions")
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            described: dict[str, Any] = sfn.describe_execution(executionArn=execution_arn)
            if described["status"] not in ("RUNNING", "PENDING_REDRIVE"):
                return described
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{execution_arn} still running after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

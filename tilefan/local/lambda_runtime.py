"""Lambda in this process: the context object, loading a handler, answering lambda:Invoke.

``tilefan.local.lambda_processes`` runs the same ``LambdaFunction`` in worker processes.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import logging
import sys
import threading
import time
import traceback
import types
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from botocore.response import StreamingBody

from tilefan.local.template import ACCOUNT_ID, REGION, FunctionSpec

__all__ = [
    "INVOKE_EVENT",
    "INVOKE_HOOK_ID",
    "Invocable",
    "LambdaContext",
    "LambdaFunction",
    "LambdaHandler",
    "LambdaService",
]


LOG = logging.getLogger(__name__)

LambdaHandler = Callable[[dict[str, Any], Any], Any]

_HANDLER_PACKAGE: Final = "tilefan_handlers"
INVOKE_EVENT: Final = "before-call.lambda.Invoke"
INVOKE_HOOK_ID: Final = "tilefan-embedded-engine-invoke"


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
        """Milliseconds left before the function's Timeout (enforced for functions in processes)."""
        elapsed = time.monotonic() - self.started_at
        return max(0, int((self.timeout_s - elapsed) * 1000))


class LambdaFunction:
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


class Invocable(Protocol):
    """What answers a function's invocations: a JSON payload in, a payload and FunctionError out."""

    def invoke(self, payload: bytes) -> tuple[bytes, str | None]:
        """Run one invocation."""
        ...


@dataclass(frozen=True)
class _HttpResponse:
    """What botocore reads of the HTTP response when a before-call handler answers."""

    status_code: int
    headers: Mapping[str, str] = field(default_factory=dict)


class LambdaService:
    """Answers ``lambda:Invoke`` from a botocore ``before-call`` hook, in this process."""

    def __init__(self, functions: Mapping[str, Invocable]) -> None:
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

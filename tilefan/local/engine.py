"""The embedded engine: the project's template, state machine and handlers on one machine.

S3, DynamoDB and Step Functions are moto's; every resource is built from ``template.yaml`` and
the ASL file it names, so the engine cannot drift from what is deployed. moto's Step Functions
interpreter runs the state machine; its Lambda tasks call ``lambda:Invoke`` through boto3, and
the engine answers those calls by running the template's handlers, in worker processes of
each function's own (``processes=True``) or in this process's threads.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, cast

import boto3
from botocore.config import Config

from tilefan.local.lambda_processes import FunctionEnvironments, FunctionError
from tilefan.local.lambda_runtime import (
    INVOKE_EVENT,
    INVOKE_HOOK_ID,
    Invocable,
    LambdaContext,
    LambdaFunction,
    LambdaHandler,
    LambdaService,
)
from tilefan.local.moto_patches import MotoPatches, moto_server
from tilefan.local.signing import EngineCredentials, sign_interpreter_clients, signed_request
from tilefan.local.template import (
    ACCOUNT_ID,
    REGION,
    FunctionSpec,
    StackTemplate,
    TemplateError,
    load_template,
)

__all__ = [
    "ACCOUNT_ID",
    "REGION",
    "EmbeddedEngine",
    "FunctionError",
    "FunctionSpec",
    "LambdaContext",
    "LambdaHandler",
    "StackTemplate",
    "TemplateError",
    "load_template",
]


LOG = logging.getLogger(__name__)

_ENGINE_ENVIRONMENT: Final = {
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    # botocore's optional checksums make moto join each PUT body in quadratic time (a 60 MB
    # PUT took 5.2 s instead of 0.9 s); S3 itself checks what it needs.
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}
_OBJECT_BUFFER_VARIABLE: Final = "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"
_OBJECT_BUFFER_BYTES: Final = 64 * 1024
"""moto keeps an object in memory up to this size and in a temporary file above it, so the
engine's memory does not grow with the image (moto's default is about 5 MB). A value already in
the environment is kept (benchmarks/engine_memory.py compares the two)."""
_MALLOC_ARENAS: Final = 2
"""glibc's malloc arenas in the engine's process at most (its default is 8 per core). Each
thread that serves a request may take an arena of its own, and the megabytes a request body
leaves there are reused only by that arena: with the default, a 4 GB upload peaked at 906 MB
against 676 MB for 400 MB; with two, at 568 and 520 MB, at the same speed
(docs/benchmarks.md, "The engine process's memory")."""
_M_ARENA_MAX: Final = -8
"""``mallopt``'s parameter number for the arena limit (glibc's ``malloc.h``)."""
_S3_CONFIG: Final = Config(signature_version="s3v4", s3={"payload_signing_enabled": False})
"""The engine's S3 client. SigV4 for presigned URLs too (botocore presigns with SigV2 for a
custom endpoint), as the API function's client does: the endpoint checks only SigV4. Bodies are
not hashed into the signature, as on AWS, where botocore sends them over HTTPS with a checksum
instead; over the engine's plain HTTP it would hash each (1.5 s of a 1 GB upload's 4.5). The
functions' own clients read the same setting from their AWS config file."""
_FUNCTION_AWS_CONFIG: Final = "aws-config"
_UNSIGNED_BODIES: Final = "[default]\ns3 =\n    payload_signing_enabled = false\n"
"""The functions' AWS config file: their S3 clients leave bodies out of the signature too."""
_LOOPBACK: Final = ("127.0.0.1", "localhost")
_DEFAULT_ENVIRONMENTS: Final = max(2, 2 * (os.cpu_count() or 1))
"""Worker processes per function at most, by default: more would only share the same cores."""
_PASSED_TO_FUNCTIONS: Final = ("PATH", "LANG", "LC_ALL", "TZ")
"""Of the engine's own environment, what a function's process sees besides its variables (Lambda
sets these too); the rest of the caller's environment is not the function's."""


def _limit_malloc_arenas() -> None:
    """Keep this process to `_MALLOC_ARENAS` malloc arenas from now on, where the C library is
    glibc (elsewhere, nothing). For good: arenas already made stay, and stopping the engine
    does not undo it."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, _MALLOC_ARENAS)


_AST_PARSE_LOCK: Final = threading.RLock()
"""Held by every ``ast.parse`` in an engine's process (`_serialise_ast_parse`)."""


def _serialise_ast_parse() -> None:
    """Let one thread of this process at a time turn source into ``ast`` objects, for good.

    CPython 3.11 keeps the AST constructor's recursion depth in one state for the process, so
    two threads in ``ast.parse`` at once can fail with "SystemError: AST constructor recursion
    depth mismatch" (python/cpython#106905). Its ``traceback`` parses source lines to place its
    carets, so every formatted traceback parses; the engine runs functions as threads, and a
    merger failed so while another thread formatted one. Reentrant: a finalizer that the
    garbage collector runs inside a parse may format a traceback too.
    """
    if getattr(ast.parse, "_tilefan_serialised", False):
        return
    parse = ast.parse

    @functools.wraps(parse)
    def serialised(*args: Any, **kwargs: Any) -> Any:
        with _AST_PARSE_LOCK:
            return parse(*args, **kwargs)

    setattr(serialised, "_tilefan_serialised", True)  # noqa: B010 - a marker on a function
    ast.parse = serialised


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
    """S3, DynamoDB and Step Functions on moto, running the template's Lambda handlers.

    ``server=False`` patches botocore in this process (moto's ``mock_aws``); ``server=True``
    starts moto's threaded HTTP server on loopback ``host:port`` (0 picks a free port), so
    presigned URLs work from any HTTP client on this machine; it answers only requests signed
    with ``credentials``, a key pair made afresh at each start. ``handlers`` maps a function's
    logical id to a handler used instead of the one its CodeUri and Handler name.
    ``parameters`` override the template's parameter defaults, and ``function_properties``
    a function's properties (``CodeUri``, ``Timeout``, ``MemorySize``, ...: what a test deploys
    instead).

    ``processes=True`` (server mode only) runs every function whose handler is not injected in
    warm worker processes of its own, at most ``environments[logical_id]`` at once (by default
    twice the cores), with only its own variables and its Timeout, MemorySize and ephemeral
    storage enforced (``tilefan.local.lambda_processes``); ``warm[logical_id]`` of them start
    in the background as the engine starts, and ``function_logs=False`` silences their output.
    ``background_nice`` is the niceness of the functions that serve no API events (the
    pipeline's): the engine stands in for separate machines, and a user's status read should
    not wait behind a tile worker for this one's cores.
    Otherwise handlers run in threads of this process.
    """

    bucket: str
    table: str
    state_machine_arn: str
    endpoint_url: str | None
    credentials: EngineCredentials

    def __init__(
        self,
        project_root: Path | None = None,
        *,
        server: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        handlers: Mapping[str, LambdaHandler] | None = None,
        parameters: Mapping[str, str] | None = None,
        function_properties: Mapping[str, Mapping[str, Any]] | None = None,
        processes: bool = False,
        environments: Mapping[str, int] | None = None,
        warm: Mapping[str, int] | None = None,
        function_logs: bool = True,
        background_nice: int = 0,
    ) -> None:
        if server and host not in _LOOPBACK:
            raise ValueError(f"the engine's endpoint listens on loopback only, not {host}")
        if processes and not server:
            # Another process reaches moto only through the server's endpoint.
            raise ValueError("functions run in processes only with server=True")
        self.project_root = (project_root or Path(__file__).resolve().parents[2]).resolve()
        self.template = load_template(self.project_root, parameters, function_properties)
        unknown = set(handlers or {}) - set(self.template.functions)
        if unknown:
            raise ValueError(f"no such functions in the template: {sorted(unknown)}")
        self._functions = {
            logical_id: LambdaFunction(spec, (handlers or {}).get(logical_id))
            for logical_id, spec in self.template.functions.items()
        }
        self._in_processes = [
            logical_id
            for logical_id in self.template.functions
            if processes and logical_id not in (handlers or {})
        ]
        self._environment_limits = dict(environments or {})
        self._warm = dict(warm or {})
        self._function_logs = function_logs
        self._background_nice = background_nice
        self._pools: dict[str, FunctionEnvironments] = {}
        self._kept_settings: dict[str, str] = {}
        self.scratch_root: Path | None = None
        self._server_mode = server
        self._host = host
        self._port = port
        self.bucket = self.template.bucket_name
        self.table = self.template.table_name
        self.state_machine_arn = self.template.state_machine_arn
        self.endpoint_url = None
        self.credentials = EngineCredentials.generate()
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
        self._patches = MotoPatches(stream_bodies=server)
        self._undo_interpreter_key: Callable[[], None] | None = None

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
        for name, value in _ENGINE_ENVIRONMENT.items():
            self._env.set(name, value)
        if _OBJECT_BUFFER_VARIABLE not in os.environ:
            self._env.set(_OBJECT_BUFFER_VARIABLE, str(_OBJECT_BUFFER_BYTES))
        _limit_malloc_arenas()
        _serialise_ast_parse()
        self._env.set("AWS_ACCESS_KEY_ID", self.credentials.access_key)
        self._env.set("AWS_SECRET_ACCESS_KEY", self.credentials.secret_key)
        for name in ("AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            self._env.set(name, None)
        # The interpreter logs its own parse notes and every JSONPath miss (a Choice's
        # IsPresent test included) at warning or error level; a job's real failures are in
        # the execution's history and the job record, so users are not shown these.
        logging.getLogger("moto.stepfunctions.parser").setLevel(logging.CRITICAL)
        settings = self.template.setting_variables()
        for name, value in self.template.environment().items():
            if name in settings and name in os.environ:
                self._kept_settings[name] = os.environ[name]
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
        self._undo_interpreter_key = sign_interpreter_clients(self.credentials)
        self._start_function_processes()
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
        self._server = moto_server(self._host, self._port, self.credentials)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
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

    def _start_function_processes(self) -> None:
        if not self._in_processes:
            return
        self.scratch_root = Path(tempfile.mkdtemp(prefix="tilefan-lambda-"))
        (self.scratch_root / _FUNCTION_AWS_CONFIG).write_text(_UNSIGNED_BODIES, encoding="ascii")
        serving = self.template.api_functions()
        for logical_id in self._in_processes:
            self._pools[logical_id] = FunctionEnvironments(
                self.template.functions[logical_id],
                self._function_environment(logical_id),
                self.scratch_root,
                limit=self._environment_limits.get(logical_id, _DEFAULT_ENVIRONMENTS),
                quiet=not self._function_logs,
                nice=0 if logical_id in serving else self._background_nice,
            )
            self._pools[logical_id].warm(self._warm.get(logical_id, 0), wait=False)

    def _function_environment(self, logical_id: str) -> dict[str, str]:
        """What a function's process sees: its own variables and how to reach the engine."""
        variables = {
            name: self._kept_settings.get(name, value)
            for name, value in self.template.function_environment(logical_id).items()
        }
        assert self.endpoint_url is not None and self.scratch_root is not None
        return {
            **{name: os.environ[name] for name in _PASSED_TO_FUNCTIONS if name in os.environ},
            **_ENGINE_ENVIRONMENT,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_key,
            "AWS_CONFIG_FILE": str(self.scratch_root / _FUNCTION_AWS_CONFIG),
            **variables,
        }

    def _post(self, url: str, body: Mapping[str, Any]) -> None:
        # moto's control API is behind the signature check too: only the engine may reset it.
        data = json.dumps(body).encode()
        signed = signed_request(self.credentials, "POST", url, data, "moto", REGION)
        request = urllib.request.Request(
            url, data=data, headers=dict(signed.headers.items()), method="POST"
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
        invocables: dict[str, Invocable] = {**self._functions, **self._pools}
        hook = cast(Callable[..., None], LambdaService(invocables))
        session.events.register(INVOKE_EVENT, hook, unique_id=INVOKE_HOOK_ID)
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
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self.scratch_root is not None:
            shutil.rmtree(self.scratch_root, ignore_errors=True)
            self.scratch_root = None
        if self._hooked_default_session:
            hooked = boto3.DEFAULT_SESSION
            if hooked is not None:
                hooked.events.unregister(INVOKE_EVENT, unique_id=INVOKE_HOOK_ID)
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
        if self._undo_interpreter_key is not None:
            self._undo_interpreter_key()
            self._undo_interpreter_key = None
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
        """What runs a template function's invocations, called as its handler is.

        For a function in processes, a call invokes it in one of its environments and raises
        ``FunctionError`` for an error answer; otherwise it is the handler (loaded on first use).
        """
        if self._session is None:
            raise RuntimeError("the engine is not running; use it as a context manager")
        if logical_id not in self._functions:
            raise KeyError(f"no function {logical_id} in the template")
        if logical_id in self._pools:
            return self._pools[logical_id]
        return self._functions[logical_id].handler()

    def environments(self, logical_id: str) -> FunctionEnvironments:
        """The worker processes of a function run in processes."""
        if logical_id not in self._pools:
            raise KeyError(f"{logical_id} does not run in processes")
        return self._pools[logical_id]

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` bound to the engine (created once, thread-safe)."""
        if self._session is None:
            raise RuntimeError("the engine is not running; use it as a context manager")
        with self._clients_lock:
            if service not in self._clients:
                # boto3's stubs only accept literal service names.
                make_client: Callable[..., Any] = self._session.client
                self._clients[service] = make_client(
                    service,
                    region_name=REGION,
                    endpoint_url=self.endpoint_url,
                    config=_S3_CONFIG if service == "s3" else None,
                )
            return self._clients[service]

    def stale_reads(self) -> contextlib.AbstractContextManager[None]:
        """Within it, DynamoDB reads without ConsistentRead see the tables as at its start."""
        return self._patches.stale_reads()

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

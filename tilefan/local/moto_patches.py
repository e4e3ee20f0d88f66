"""Where the engine changes moto, and moto's server with the middleware the engine needs."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import logging
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from tilefan.local.signing import EngineCredentials, SignatureCheck

__all__ = ["MotoPatches", "moto_server"]


LOG = logging.getLogger(__name__)

_EVENTUALLY_CONSISTENT_READS = frozenset({"GetItem", "Query", "Scan", "BatchGetItem"})


class MotoPatches:
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
    - moto's DynamoDB reads are always up to date. On AWS a GetItem, Query or Scan without
      ``ConsistentRead`` may miss recent writes. Inside `stale_reads` such a read is answered
      from a copy of the tables taken when it began, the stalest answer DynamoDB may give, so a
      test shows which decisions need a consistent read.
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
        self._request_lock = threading.RLock()
        self._stale_tables: dict[tuple[str, str], Any] | None = None

    def install(self) -> None:
        """Apply every change."""
        # moto imports a service's URL module on its first request; the first range reads of
        # a job come from several libvips threads at once, and one of them could find the
        # module half-imported ("moto.s3.urls not in sys.modules"). Import them here, once.
        for service in ("s3", "dynamodb", "stepfunctions"):
            importlib.import_module(f"moto.{service}.urls")
        self._serialise_dynamodb()
        self._install_failure_threshold()
        self._keep_stops()
        self._install_speedups()

    def _serialise_dynamodb(self) -> None:
        from moto.dynamodb.responses import DynamoHandler

        original_call_action = DynamoHandler.call_action

        def call_action(handler: Any) -> Any:
            with self._request_lock:
                stale = self._stale_tables
                if stale is None or not _eventually_consistent(handler):
                    return original_call_action(handler)
                backend = handler.dynamodb_backend
                live = backend.tables
                backend.tables = stale.get((handler.current_account, handler.region), live)
                try:
                    return original_call_action(handler)
                finally:
                    backend.tables = live

        self._replace(DynamoHandler, "call_action", call_action)

    @contextlib.contextmanager
    def stale_reads(self) -> Iterator[None]:
        """Answer reads without ``ConsistentRead`` from the tables as they are now, until exit."""
        from moto.dynamodb.models import dynamodb_backends

        with self._request_lock:
            self._stale_tables = {
                (account, region): copy.deepcopy(backend.tables)
                for account, regions in dynamodb_backends.items()
                for region, backend in regions.items()
            }
        try:
            yield
        finally:
            with self._request_lock:
                self._stale_tables = None

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


def moto_server(host: str, port: int, credentials: EngineCredentials) -> Any:
    """moto's ThreadedMotoServer, its WSGI application behind ``SignatureCheck`` and
    ``_KeepPutBodies``: only requests signed with ``credentials`` reach moto."""
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
            app = SignatureCheck(
                _KeepPutBodies(DomainDispatcherApplication(create_backend_app)), credentials
            )
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return MotoServer(ip_address=host, port=port, verbose=False)


def _eventually_consistent(handler: Any) -> bool:
    """Whether the request is a read that DynamoDB may answer from a lagging replica."""
    action = handler._get_action()
    params = getattr(handler, "params", None) or {}
    if action == "BatchGetItem":
        # Consistency is asked per table, inside the request's items.
        tables = (params.get("RequestItems") or {}).values()
        return not all(table.get("ConsistentRead") for table in tables)
    return action in _EVENTUALLY_CONSISTENT_READS and not params.get("ConsistentRead")


def _interpreter_module(name: str) -> types.ModuleType:
    return importlib.import_module(f"moto.stepfunctions.parser.{name}")

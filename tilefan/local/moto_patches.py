"""Where the engine changes moto (and botocore's parse of DynamoDB values), and moto's server
with the middleware the engine needs."""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import tempfile
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from tilefan.local.signing import EngineCredentials, SignatureCheck

__all__ = ["MotoPatches", "moto_dispatcher", "moto_server"]


LOG = logging.getLogger(__name__)

_EVENTUALLY_CONSISTENT_READS = frozenset({"GetItem", "Query", "Scan", "BatchGetItem"})
_BATCH_GET_KEYS = 100
"""DynamoDB's most keys in one BatchGetItem; moto answers (refuses) a request above it."""
_BATCH_GET_BYTES = 16 * 1024 * 1024
"""DynamoDB's most bytes in one BatchGetItem answer; moto answers one that would pass it."""
_ATTRIBUTE_VALUE_MEMBERS = frozenset({"S", "N", "B", "SS", "NS", "BS", "M", "L", "NULL", "BOOL"})
"""The members of DynamoDB's ``AttributeValue`` shape, as botocore's model names them."""
_SCALARS = frozenset({"S", "N", "BOOL", "NULL"})
"""DynamoDB value types written the same in JSON as moto keeps and botocore parses them."""
_PLAIN_BATCH_GET_FIELDS = frozenset(
    {"Keys", "ConsistentRead", "ProjectionExpression", "ExpressionAttributeNames"}
)


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
    - moto answers a BatchGetItem by deep-copying every item it projects, turning each value
      into Python and back, and writing the answer through its model-driven serializer, one
      call chain per list element: about 5 s for the 100 band items of a 20,000-tile job (a
      status read). A BatchGetItem that asks for whole keys and top-level attributes (as the
      status read does) is answered from the same stored items and written with
      ``json.dumps``, the same answer (``tests/integration/test_moto_patches.py`` compares
      the two); any other BatchGetItem, or one that moto would refuse or cut short, is
      answered by moto itself.
    - botocore parses each DynamoDB value by walking its model shape, trying all ten members
      of ``AttributeValue`` for every list element: about 0.1 s of the client's CPU for the
      20,000 letters of a status read, in the engine's process, where the job's threads
      compete for it. While the engine runs, a value of the plain form DynamoDB sends (one
      member) is parsed directly to the same result; anything else goes through botocore
      (the test compares the two). The engine's own process only: on AWS and in the API
      processes of ``tilefan serve`` botocore parses as it always does.
    - moto answers a ranged GetObject by reading the whole object and slicing it. Workers read
      their blocks of a transcoded source by range, so each read cost the whole object: a
      100 MP demo spent its time copying the intermediate. A GET with one byte range reads
      only that range from moto's buffer; every answer (status, headers, body, errors) is
      moto's own (the test compares the two).
    - moto keeps objects above ``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE`` in temporary files, parts
      of a multipart upload included, but holds a large object whole while it passes through:
      CompleteMultipartUpload joins every part into one ``bytearray`` (and again for its
      checksum, then copies both), UploadPartCopy reads the whole source to slice its range,
      and a GET reads the whole object into one ``bytes``. A 2 GP job's engine reached 15 GB.
      Here completion copies the parts a chunk at a time into the new object's file, a copied
      part reads only its range, and with ``stream_bodies`` (moto's server) a GET's body is
      sent from the file a chunk at a time. Validation, ETag and checksums are moto's (the
      test compares both answers, refusals included, and measures the peak).
    """

    def __init__(self, *, stream_bodies: bool = False) -> None:
        self._stream_bodies = stream_bodies
        """Whether a GET's body may be an iterable of chunks (moto's server sends it as such;
        in process, moto's mock wants bytes)."""
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
        self._answer_plain_batch_reads()
        self._parse_attribute_values_directly()
        self._install_failure_threshold()
        self._keep_stops()
        self._install_speedups()
        self._read_objects_by_chunks()

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

    def _answer_plain_batch_reads(self) -> None:
        # moto is imported where a patch is installed, never at import: the Lambda layer ships
        # this package without moto.
        from moto.core.responses import ActionResult
        from moto.dynamodb.responses import DynamoHandler

        class _WireResult(ActionResult):
            """An answer already written in DynamoDB's JSON wire form: moto's status and
            headers for the operation, the body as given instead of through moto's
            per-value serializer."""

            def execute_result(self, context: Any) -> tuple[int, dict[str, str], str]:
                status, headers, _ = ActionResult({}).execute_result(context)
                return status, headers, str(self.result)

        original_batch_get_item = DynamoHandler.batch_get_item

        def batch_get_item(handler: Any) -> Any:
            answer = _plain_batch_get(handler)
            return original_batch_get_item(handler) if answer is None else _WireResult(answer)

        self._replace(DynamoHandler, "batch_get_item", batch_get_item)

    def _parse_attribute_values_directly(self) -> None:
        from botocore.parsers import BaseJSONParser

        # botocore's stubs leave out the parser's handlers.
        original_handle_structure = getattr(BaseJSONParser, "_handle_structure")  # noqa: B009

        def handle_structure(parser: Any, shape: Any, value: Any) -> Any:
            if shape.name == "AttributeValue" and set(shape.members) == _ATTRIBUTE_VALUE_MEMBERS:
                with contextlib.suppress(_NotPlain):
                    return _attribute_value(parser._blob_parser, value)
            return original_handle_structure(parser, shape, value)

        self._replace(BaseJSONParser, "_handle_structure", handle_structure)

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

    def _read_objects_by_chunks(self) -> None:
        from moto.s3.models import FakeKey, FakeMultipart, S3Backend
        from moto.s3.responses import S3Response

        by_chunks = threading.local()
        whole_value: property = FakeKey.__dict__["value"]
        read_whole, write_whole = whole_value.fget, whole_value.fset
        assert read_whole and write_whole, "moto's FakeKey.value is no longer a property"
        original_key_response = S3Response.key_response
        original_upload_part_copy = S3Backend.upload_part_copy

        def key_response(handler: Any, request: Any, full_url: str, headers: Any) -> Any:
            by_chunks.on = request.method == "GET"
            try:
                status, response_headers, body = original_key_response(
                    handler, request, full_url, headers
                )
            finally:
                by_chunks.on = False
            if not isinstance(body, _ObjectBytes):
                return status, response_headers, body
            # The whole object (no range, or one moto ignores).
            return status, response_headers, body.chunks() if self._stream_bodies else body[:]

        def upload_part_copy(backend: Any, *args: Any, **kwargs: Any) -> Any:
            by_chunks.on = True  # moto slices the source's value: only the range is read
            try:
                return original_upload_part_copy(backend, *args, **kwargs)
            finally:
                by_chunks.on = False

        def value(key: Any) -> Any:
            return _ObjectBytes(key) if getattr(by_chunks, "on", False) else read_whole(key)

        def set_value(key: Any, new_value: Any) -> None:
            if isinstance(new_value, _ObjectBytes):  # a copied part of a whole object
                new_value = _spooled(new_value.chunks(), key._max_buffer_size)
            if not isinstance(new_value, _Spooled):
                write_whole(key, new_value)
                return
            key._value_buffer.close()
            key._value_buffer = new_value.buffer
            key.contentsize = new_value.size

        self._replace(S3Response, "key_response", key_response)
        self._replace(S3Backend, "upload_part_copy", upload_part_copy)
        self._replace(FakeMultipart, "complete", _complete_by_chunks)
        self._replace(FakeKey, "value", property(value, set_value))

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


_CHUNK = 2**20
"""Bytes read from or written to an object's file at once."""


class _ObjectBytes:
    """An object's bytes in moto's buffer, read only where sliced (moto takes ``len`` and one
    slice of a ranged GET's body or a copied part's range) or a chunk at a time."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def __len__(self) -> int:
        return int(self._key.size)

    def __getitem__(self, part: slice) -> bytes:
        start, stop, step = part.indices(len(self))
        if step != 1:
            raise ValueError("only contiguous ranges are read")
        with self._key.lock:
            self._key._value_buffer.seek(start)
            data: bytes = self._key._value_buffer.read(max(0, stop - start))
        return data

    def chunks(self) -> Iterator[bytes]:
        """The whole object, in order, a chunk at a time."""
        for start in range(0, len(self), _CHUNK):
            yield self[start : start + _CHUNK]


class _Spooled:
    """An object's bytes already written to a buffer of moto's kind, which the new key takes
    as its own instead of copying."""

    def __init__(self, buffer: Any, size: int) -> None:
        self.buffer = buffer
        self.size = size


def _spooled(chunks: Iterable[bytes], max_in_memory: int) -> _Spooled:
    """``chunks`` written to a temporary file, or kept in memory up to ``max_in_memory`` bytes,
    as moto keeps an object."""
    buffer = tempfile.SpooledTemporaryFile(max_in_memory)  # noqa: SIM115 - the new key owns it
    size = 0
    for chunk in chunks:
        if size + len(chunk) > max_in_memory:
            buffer.rollover()  # before the write, so that a large chunk is not held twice
        buffer.write(chunk)
        size += len(chunk)
    return _Spooled(buffer, size)


def _complete_by_chunks(multipart: Any, body: Iterable[tuple[int, str]]) -> Any:
    """moto's ``FakeMultipart.complete`` (the same checks in the same order, the same ETag and
    checksum), with the parts copied a chunk at a time into the new object's file instead of
    joined in memory."""
    from moto.s3 import models
    from moto.s3.exceptions import EntityTooSmall, InvalidPart, MalformedXML
    from moto.s3.utils import compute_checksum
    from moto.settings import get_s3_default_key_buffer_size

    checksums = models.MultipartChecksumBuilder(
        multipart.metadata.get("x-amz-checksum-algorithm"),
        multipart.metadata.get("x-amz-checksum-type"),
    )
    algorithm, composite = checksums.checksum_algorithm, checksums.checksum_type == "COMPOSITE"
    parts: list[Any] = []
    for number, etag in body:
        part = multipart.parts.get(number)
        if part is None or part.etag.replace('"', "") != etag.replace('"', ""):
            raise InvalidPart()
        if parts and parts[-1].contentsize < models.S3_UPLOAD_PART_MIN_SIZE:  # type: ignore[attr-defined]
            raise EntityTooSmall()
        parts.append(part)
    if not parts:
        raise MalformedXML
    whole = _RunningChecksum(algorithm)
    part_checksums = bytearray()

    def chunks() -> Iterator[bytes]:
        for part in parts:
            one_part = _RunningChecksum(algorithm)
            for chunk in _ObjectBytes(part).chunks():
                (one_part if composite else whole).update(chunk)
                yield chunk
            part_checksums.extend(one_part.digest())

    value = _spooled(chunks(), get_s3_default_key_buffer_size())
    etags = b"".join(bytes.fromhex(part.etag.replace('"', "")) for part in parts)
    checksum = (
        compute_checksum(bytes(part_checksums), algorithm).decode()
        if composite
        else base64.b64encode(whole.digest()).decode()
    )
    return (
        value,
        f"{hashlib.md5(etags, usedforsecurity=False).hexdigest()}-{len(parts)}",
        (checksums.checksum_type, checksum, len(parts)),
    )


class _RunningChecksum:
    """moto's ``compute_checksum`` of a body given a chunk at a time (the same algorithms, and
    the same fallback to CRC32 where moto finds no library for CRC32C or CRC64NVME)."""

    def __init__(self, algorithm: str) -> None:
        from moto.core.compat import HAS_CRT

        self._hash: Any = None
        self._crc = 0
        self._width = 4
        self._crc_of: Callable[[bytes, int], int] = binascii.crc32
        if algorithm in ("SHA1", "SHA256") or algorithm not in _CRCS:
            self._hash = hashlib.new("sha1" if algorithm == "SHA1" else "sha256")
        elif algorithm == "CRC32C" and importlib.util.find_spec("crc32c") is not None:
            crc32c = importlib.import_module("crc32c")
            self._crc_of = lambda data, previous: int(crc32c.crc32c(data, previous))
        elif algorithm == "CRC64NVME" and HAS_CRT:
            checksums = importlib.import_module("awscrt.checksums")
            self._crc_of = lambda data, previous: int(checksums.crc64nvme(data, previous))
            self._width = 8

    def update(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)
        else:
            self._crc = self._crc_of(data, self._crc)

    def digest(self) -> bytes:
        if self._hash is not None:
            return bytes(self._hash.digest())
        return self._crc.to_bytes(self._width, "big")


_CRCS = frozenset({"CRC32", "CRC32C", "CRC64NVME"})


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


def moto_dispatcher() -> Any:
    """moto's ``DomainDispatcherApplication``, which finds the service a request is for, with
    the backend of each host remembered.

    moto finds it again for every request under one process-wide lock: it lists moto's package
    directory (``os.listdir`` and an ``isdir`` for each of about 175 services) and matches
    the host against every service's URL patterns, about 3 ms of CPU per request on this
    machine. Every S3 and DynamoDB request of every worker queued on that lock, and with the
    engine's threads competing for the GIL the lock's holder was often descheduled while it
    held it: a status read waited behind the whole queue (docs/reliability.md, "Status reads
    under load"). A host's backend never changes while the server runs.
    """
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    def backend_app(service: Any) -> Any:
        app = create_backend_app(service)
        # moto turns Flask's debug mode on, in which Flask gives each request's empty form
        # files a class of its own whose method refers back to the request
        # (flask.debughelpers): every request, with its body and moto's copy of it, then
        # waits for Python's cyclic collector, which large bytes do not wake. An upload's
        # parts piled up by the gigabyte (docs/benchmarks.md, "The engine's memory").
        app.debug = False
        return app

    class Dispatcher(DomainDispatcherApplication):
        def __init__(self) -> None:
            super().__init__(backend_app)
            self._backends: dict[str | None, Any] = {}

        def get_backend_for_host(self, host: str | None) -> Any:
            if host not in self._backends:  # called under moto's lock
                self._backends[host] = super().get_backend_for_host(host)
            return self._backends[host]

    return Dispatcher()


def moto_server(host: str, port: int, credentials: EngineCredentials) -> Any:
    """moto's ThreadedMotoServer, its WSGI application (`moto_dispatcher`) behind
    ``SignatureCheck`` and ``_KeepPutBodies``: only requests signed with ``credentials`` reach
    moto."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class MotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            # As ThreadedMotoServer._server_entry, with the middleware around the app.
            app = SignatureCheck(_KeepPutBodies(moto_dispatcher()), credentials)
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return MotoServer(ip_address=host, port=port, verbose=False)


def _plain_batch_get(handler: Any) -> str | None:
    """The BatchGetItem answer, as JSON, of a request that names whole keys and top-level
    attributes only; None for moto to answer (refusals and cut-short answers included), so
    that only moto decides what it refuses."""
    from moto.dynamodb.responses import ProjectionExpressionParser, validate_attributes_used

    requests: dict[str, Any] = handler.body["RequestItems"]
    if sum(len(request["Keys"]) for request in requests.values()) > _BATCH_GET_KEYS:
        return None
    backend = handler.dynamodb_backend
    answer: dict[str, Any] = {"ConsumedCapacity": [], "Responses": {}, "UnprocessedKeys": {}}
    for table_name, request in requests.items():
        keys: list[Any] = request["Keys"]
        if set(request) - _PLAIN_BATCH_GET_FIELDS or any(
            key in keys[:position] for position, key in enumerate(keys)
        ):
            return None
        names = request.get("ExpressionAttributeNames", {})
        parser = ProjectionExpressionParser(request.get("ProjectionExpression"), names)
        paths: list[list[str]] = parser.parse()
        validate_attributes_used(names, parser.expr_attr_names_found, validation_error_prefix=False)
        if any(len(path) != 1 or "[" in path[0] for path in paths):
            return None  # a nested path or a list element: moto's projection
        wanted = [path[0] for path in paths]
        items = []
        for key in keys:
            item = backend.get_item(table_name, key)
            if item is not None:
                attributes = (
                    item.attrs
                    if not wanted
                    else {name: item.attrs[name] for name in wanted if name in item.attrs}
                )
                items.append({name: _wire(value) for name, value in attributes.items()})
        answer["Responses"][table_name] = items
        answer["ConsumedCapacity"].append(
            {"CapacityUnits": float(len(keys)), "TableName": table_name}
        )
    body = json.dumps(answer)
    # The JSON of every value is at least as long as DynamoDB counts its size, so an answer
    # this short fits in one response; a longer one may not, and moto cuts it short itself.
    return body if len(body) <= _BATCH_GET_BYTES else None


def _wire(value: Any) -> dict[str, Any]:
    """A stored moto ``DynamoType`` as DynamoDB writes it in JSON (binary in base64)."""
    kind, inner = value.type, value.value
    if kind == "L":  # the status read's letters: scalars written inline, a call each saved
        return {
            kind: [
                {element.type: element.value} if element.type in _SCALARS else _wire(element)
                for element in inner
            ]
        }
    if kind == "M":
        return {kind: {name: _wire(element) for name, element in inner.items()}}
    if kind == "B":
        return {kind: _base64(inner)}
    if kind == "BS":
        return {kind: [_base64(element) for element in inner]}
    return {kind: inner}


def _base64(binary: bytes | str) -> str:
    """moto keeps a binary value as bytes or as the base64 text it was sent as."""
    raw = binary if isinstance(binary, bytes) else base64.b64decode(binary)
    return base64.b64encode(raw).decode("ascii")


class _NotPlain(Exception):
    """A DynamoDB value not of the plain one-member form: botocore parses it."""


def _attribute_value(blob: Callable[[str], bytes], value: Any) -> Any:
    """What botocore's JSON parser makes of a plain DynamoDB value (binary decoded)."""
    if value is None:
        return None
    if type(value) is not dict or len(value) != 1:
        raise _NotPlain
    [(kind, inner)] = value.items()
    if inner is None:
        raise _NotPlain
    if kind in _SCALARS:
        return value  # parsed as it came: botocore's parse would only copy it
    if kind in ("SS", "NS"):
        return {kind: list(inner)}
    if kind == "L":
        return {kind: [_list_element(blob, element) for element in inner]}
    if kind == "M":
        return {kind: {name: _attribute_value(blob, element) for name, element in inner.items()}}
    if kind == "B":
        return {kind: blob(inner)}
    if kind == "BS":
        return {kind: [None if element is None else blob(element) for element in inner]}
    raise _NotPlain


def _list_element(blob: Callable[[str], bytes], element: Any) -> Any:
    """`_attribute_value` of a list element, a scalar (the common case) without another call."""
    if type(element) is dict and len(element) == 1:
        for kind, inner in element.items():
            if kind in _SCALARS and inner is not None:
                return element
    return _attribute_value(blob, element)


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

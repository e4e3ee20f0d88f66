"""`tilefan serve`: the API handler behind a local HTTP server, on the embedded engine.

The server plays API Gateway's part: it checks the `x-api-key` header against its keys (a
missing or unknown key is refused before the handler runs, as API Gateway does), turns each
request into a REST proxy event carrying the key's id, and turns the handler's answer back.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tilefan.local.engine import FunctionError, LambdaContext
from tilefan.local.persistence import DataDir, Restored
from tilefan.local.stack import LocalStack, local_stack

__all__ = ["LocalApi", "api_key_id", "new_api_key", "serve_api"]

ApiHandler = Callable[[dict[str, Any], Any], dict[str, Any]]

_MAX_BODY = 10 * 2**20
"""A REST API's payload limit: refused here too, so nothing works only locally."""


def new_api_key() -> str:
    """A fresh random API key."""
    return "tf-" + secrets.token_urlsafe(24)


def api_key_id(key: str) -> str:
    """A stable id for a key, as API Gateway gives each key an id: the owner of its jobs."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _forbidden() -> tuple[int, dict[str, str], bytes]:
    body = {"code": "FORBIDDEN", "message": "send a valid API key in the x-api-key header"}
    return 403, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _function_failed(error: FunctionError) -> tuple[int, dict[str, str], bytes]:
    """API Gateway's answer when the function's invocation fails (the template's responses)."""
    if error.error_type == "Sandbox.Timedout":
        status, body = 504, {"code": "TIMEOUT", "message": "the request took too long; try again"}
    else:
        status, body = 502, {"code": "INTERNAL_ERROR", "message": "the API function failed"}
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


class _Gateway:
    """Translates HTTP requests to REST proxy events and back."""

    def __init__(
        self,
        handler: ApiHandler,
        keys: Iterable[str],
        keyless: Iterable[tuple[str, re.Pattern[str]]] = (),
    ) -> None:
        self.handler = handler
        self.key_ids = {key: api_key_id(key) for key in keys}
        self.keyless = tuple(keyless)

    def __call__(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        lowered = {name.lower(): value for name, value in headers.items()}
        key_id = self.key_ids.get(lowered.get("x-api-key", ""))
        url = urlsplit(target)
        # As API Gateway: routes the template marks ApiKeyRequired: false need no key (the job
        # page's, and the CORS preflight, which a browser sends without one).
        if key_id is None and not any(
            route_method in ("ANY", method.upper()) and route.match(url.path)
            for route_method, route in self.keyless
        ):
            return _forbidden()
        query = parse_qs(url.query, keep_blank_values=True)
        text = body.decode("utf-8", errors="replace") if body else None
        # API Gateway tells the handler how the client reached it; here that is plain HTTP.
        headers = {**headers, "X-Forwarded-Proto": "http"}
        event = {
            "resource": "/{proxy+}",
            "path": url.path,
            "httpMethod": method,
            "headers": headers,
            "multiValueHeaders": {name: [value] for name, value in headers.items()},
            "queryStringParameters": {k: v[-1] for k, v in query.items()} or None,
            "multiValueQueryStringParameters": query or None,
            "pathParameters": {"proxy": url.path.lstrip("/")},
            "stageVariables": None,
            "requestContext": {
                "resourcePath": "/{proxy+}",
                "httpMethod": method,
                "path": url.path,
                "stage": "local",
                "requestId": str(uuid.uuid4()),
                "identity": {"apiKeyId": key_id, "sourceIp": "127.0.0.1", "userArn": None},
                "apiId": "local",
            },
            "body": text,
            "isBase64Encoded": False,
        }
        try:
            answer = self.handler(event, LambdaContext(function_name="ApiFunction"))
        except FunctionError as e:
            return _function_failed(e)
        out_headers = {str(k): str(v) for k, v in (answer.get("headers") or {}).items()}
        for name, values in (answer.get("multiValueHeaders") or {}).items():
            out_headers[str(name)] = ", ".join(str(v) for v in values)
        payload = answer.get("body") or ""
        data = base64.b64decode(payload) if answer.get("isBase64Encoded") else payload.encode()
        return int(answer["statusCode"]), out_headers, data


def _request_handler(gateway: _Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                # The body is left unread, so the connection cannot carry another request.
                self.close_connection = True
                status, headers, data = (
                    413,
                    {"Content-Type": "application/json"},
                    json.dumps(
                        {"code": "PAYLOAD_TOO_LARGE", "message": "request bodies are at most 10 MB"}
                    ).encode(),
                )
            else:
                body = self.rfile.read(length) if length else b""
                status, headers, data = gateway(self.command, self.path, dict(self.headers), body)
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in ("content-length", "connection"):
                    self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            """What the HTTP layer refuses itself (a 100,000-character path: 414), in JSON."""
            status = HTTPStatus(code)
            body = json.dumps(
                {
                    "code": status.name,
                    "message": f"{status.phrase.lower()}: {message or status.description}",
                }
            ).encode()
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def __getattr__(self, name: str) -> Any:
            # API Gateway's ANY method hands every verb to the handler; so does this server.
            if name.startswith("do_"):
                return self._answer
            raise AttributeError(name)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the API logs through Powertools."""

    return Handler


@dataclass(frozen=True)
class LocalApi:
    """A running local API: its URL, the keys it accepts, and the stack behind it."""

    url: str
    keys: tuple[str, ...]
    stack: LocalStack
    data_dir: DataDir | None = None
    restored: Restored | None = None


@contextmanager
def serve_api(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    keys: Iterable[str] = (),
    api_processes: int = 0,
    data_dir: Path | None = None,
    function_logs: bool = True,
) -> Iterator[LocalApi]:
    """Run the API on ``host:port`` (0 picks a free port) over the engine in server mode.

    ``api_processes`` > 0 runs every function in worker processes of its own, as Lambda does
    (``EmbeddedEngine(processes=True)``), the API in that many warm ones, so that many requests
    are answered at once, and the pipeline's functions at a lower CPU priority (niceness 10) so
    that status reads do not wait behind tile work; 0 runs every handler in this process, the API
    one request at a time,
    where a test can patch what they call. ``data_dir`` keeps jobs, objects and keys across
    restarts (``tilefan.local.persistence``); without it they live as long as the server.
    """
    with (
        local_stack(
            server=True,
            processes=api_processes > 0,
            environments={"ApiFunction": api_processes} if api_processes else None,
            function_logs=function_logs,
            # The pipeline's functions yield the cores to the API and the storage it reads.
            background_nice=10,
        ) as stack,
        contextlib.ExitStack() as cleanup,
    ):
        kept = DataDir(data_dir) if data_dir is not None else None
        restored = None
        if kept is None:
            accepted = tuple(keys) or (new_api_key(),)
        else:
            accepted = kept.api_keys(keys, new_api_key)
            restored = kept.restore(stack)
            cleanup.callback(kept.save, stack)  # runs last: after the API has stopped
        if api_processes:
            stack.engine.environments("ApiFunction").warm(api_processes)
        handler: ApiHandler = stack.engine.handler("ApiFunction")
        gateway = _Gateway(handler, accepted, stack.engine.template.keyless_routes())
        server = ThreadingHTTPServer((host, port), _request_handler(gateway))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name="tilefan-api", daemon=True)
        thread.start()
        try:
            yield LocalApi(
                f"http://{host}:{server.server_address[1]}", accepted, stack, kept, restored
            )
        finally:
            server.shutdown()
            server.server_close()

"""Template functions in their own warm worker processes, with Lambda's limits enforced.

Lambda runs each function in execution environments of its own: one invocation at a time per
environment, environments reused while warm, only the function's own environment variables,
and its limits enforced from outside the runtime. ``FunctionEnvironments`` does the same for
one template function with worker processes, which reach the engine's storage through its
signed endpoint with the engine's key, as a function reaches AWS with its role's:

- **Timeout**: the invocation's process is killed (SIGKILL, so no ``finally`` or ``except``
  runs) and the invocation answers as Lambda does, ``Sandbox.Timedout``.
- **MemorySize**: a watchdog reads the process's resident memory while it works and kills it
  past the limit; the invocation answers ``Runtime.OutOfMemory``, as Lambda reports a runtime
  the kernel killed for memory.
- **Ephemeral storage**: the environment's /tmp is a directory of its own (``TMPDIR``, and any
  variable the template sets to ``/tmp``); past ``EphemeralStorage`` the watchdog kills the
  process (``Runtime.ExitError``). On Lambda the write that fills /tmp fails instead
  (``ENOSPC``); the engine has no file system of that size to give it.

A killed invocation's environment keeps its /tmp, as Lambda's does when it restarts a runtime
in the same environment: the next invocation there finds what the killed one left. The engine
removes every environment's directory when it stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from tilefan.local.lambda_runtime import LambdaFunction
from tilefan.local.template import FunctionSpec

__all__ = ["FunctionEnvironments", "FunctionError"]

LOG = logging.getLogger(__name__)

_WATCH_SECONDS: Final = 0.05
"""How often the watchdog looks at a working process's memory (and, every 20th time, its
/tmp): a process can overshoot its memory by what it allocates in that time."""
_STORAGE_EVERY: Final = 20
_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_KILLED: Final = "Runtime exited with error: signal: killed"


class FunctionError(Exception):
    """An invocation answered with Lambda's ``FunctionError``: its errorType and errorMessage."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


class _Stderr:
    """The engine's stderr as it is now, handed to a process forked from the fork server (whose
    own stderr is the engine's when the server started: a test's capture may have moved it)."""

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        # Pickled while the process starts: the fd travels with it, as a Connection's does.
        return _detach, (reduction.DupFd(sys.stderr.fileno()),)


def _detach(duplicate: Any) -> int:
    fd: int = duplicate.detach()
    return fd


def _serve(
    spec: FunctionSpec,
    environment: Mapping[str, str],
    conn: Connection,
    stderr: int | None,
    nice: int,
) -> None:
    """A worker process: load the handler, then answer one invocation at a time."""
    os.environ.clear()
    os.environ.update(environment)
    os.nice(nice)
    # stdout is the user's (a CLI run prints its result there): a function's log lines go to
    # the engine's stderr, or nowhere (``stderr`` None) when the engine's owner asked for quiet.
    sink = os.open(os.devnull, os.O_WRONLY) if stderr is None else stderr
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    code_dir = str(spec.code_uri)
    if code_dir not in sys.path:  # as on Lambda, a handler imports its siblings
        sys.path.append(code_dir)
    function = LambdaFunction(spec, None)
    # Warm before the first invocation; a handler that does not load is loaded again by the
    # invocation, which answers with the error.
    with contextlib.suppress(Exception):
        function.handler()
    conn.send(os.getpid())
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:  # the engine closed the environment
            return
        result, function_error = function.invoke(payload)
        conn.send((result, function_error))


_PRELOADED: Final = ["boto3", "aws_lambda_powertools.event_handler", "pydantic", "pyvips"]
"""Imported once by the fork server, so that an environment's cold start does not import them
again (about half of a handler's import time). Not numpy: it starts a thread, and a process
with threads must not fork."""


def _context() -> Any:
    """Processes forked from a fork server: a clean process of its own, never the engine's
    (a fork of the engine would copy its threads and locks mid-use)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOADED)
    return context


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):  # gone, or no /proc (not Linux): not watched
        return 0


def _stored_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # removed while counted
                continue
    return total


def _error(error_type: str, message: str, request_id: str) -> bytes:
    text = f"RequestId: {request_id} Error: {message}"
    return json.dumps({"errorType": error_type, "errorMessage": text}).encode()


class _Environment:
    """One execution environment: a worker process and its /tmp, which outlives the process."""

    def __init__(
        self, spec: FunctionSpec, environment: Mapping[str, str], tmp: Path, quiet: bool, nice: int
    ) -> None:
        self.spec = spec
        self.tmp = tmp
        tmp.mkdir(parents=True)
        self._environment = {
            **{name: str(tmp) if value == "/tmp" else value for name, value in environment.items()},
            "TMPDIR": str(tmp),
            # Lambda's own: code that may change process-wide state knows it runs alone.
            "AWS_LAMBDA_FUNCTION_NAME": spec.logical_id,
        }
        self._quiet = quiet
        self._nice = nice
        self._process: Any = None
        self._conn: Connection | None = None
        self._starting = threading.Lock()

    def _started(self) -> Connection:
        with self._starting:  # an invocation waits for a warm-up under way, not starts another
            return self._conn or self._start()

    def _start(self) -> Connection:
        context = _context()
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(
                self.spec,
                self._environment,
                theirs,
                None if self._quiet else _Stderr(),
                self._nice,
            ),
            name=f"tilefan-{self.spec.logical_id}",
            daemon=True,
        )
        process.start()
        theirs.close()
        try:
            ours.recv()  # its pid, once the handler is loaded: the cold start is not timed
        except EOFError as e:
            process.join()
            raise RuntimeError(
                f"{self.spec.logical_id}: its worker process exited ({process.exitcode}) "
                "before it was ready"
            ) from e
        self._process, self._conn = process, ours
        connection: Connection = ours
        return connection

    def warm(self) -> None:
        """Start the process now, so that no invocation waits for its cold start."""
        self._started()

    def invoke(self, payload: bytes) -> tuple[bytes, str | None]:
        conn = self._started()
        process = self._process
        request_id = str(uuid.uuid4())
        conn.send_bytes(payload)
        deadline = time.monotonic() + self.spec.timeout_s
        memory_bytes = self.spec.memory_mb * 2**20
        storage_bytes = self.spec.ephemeral_mb * 2**20
        watched = 0
        while True:
            try:
                if conn.poll(_WATCH_SECONDS):
                    answer: tuple[bytes, str | None] = conn.recv()
                    return answer
            except (EOFError, OSError):  # it died on its own (a crash), or the engine stopped
                process.join()
                self._forget()
                code = process.exitcode
                how = f"signal: {-code}" if code is not None and code < 0 else f"exit status {code}"
                message = f"Runtime exited with error: {how}"
                return _error("Runtime.ExitError", message, request_id), "Unhandled"
            watched += 1
            if time.monotonic() >= deadline:
                self.kill()
                message = f"Task timed out after {self.spec.timeout_s:.2f} seconds"
                return _error("Sandbox.Timedout", message, request_id), "Unhandled"
            if _resident_bytes(process.pid) > memory_bytes:
                self.kill()
                return _error("Runtime.OutOfMemory", _KILLED, request_id), "Unhandled"
            if watched % _STORAGE_EVERY == 0 and _stored_bytes(self.tmp) > storage_bytes:
                self.kill()
                return _error("Runtime.ExitError", _KILLED, request_id), "Unhandled"

    def kill(self) -> None:
        """Kill the process at once (its /tmp stays); the next invocation starts another."""
        if self._process is not None:
            self._process.kill()
            self._process.join()
        self._forget()

    def _forget(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None

    def close(self) -> None:
        """Stop the process (it finishes nothing) and remove its /tmp."""
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _warm(environment: _Environment) -> None:
    try:
        environment.warm()
    except RuntimeError:  # the engine stopped meanwhile; an invocation would say so
        LOG.warning("%s: an environment did not start", environment.spec.logical_id)


class FunctionEnvironments:
    """Warm worker processes for one template function, up to ``limit`` at once.

    ``nice`` lowers their CPU priority (``os.nice``).

    An invocation takes an idle environment, or starts one while fewer than ``limit`` exist,
    or waits for one (its Timeout counts from when an environment takes it).
    """

    def __init__(
        self,
        spec: FunctionSpec,
        environment: Mapping[str, str],
        scratch_root: Path,
        *,
        limit: int,
        quiet: bool = False,
        nice: int = 0,
    ) -> None:
        if limit < 1:
            raise ValueError(f"{spec.logical_id}: at least one environment is needed")
        self.spec = spec
        self.limit = limit
        self._environment = dict(environment)
        self._root = scratch_root
        self._quiet = quiet
        self._nice = nice
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._idle: list[_Environment] = []
        self._all: list[_Environment] = []
        self._closed = False

    @property
    def environments(self) -> list[Path]:
        """Each environment's /tmp directory."""
        with self._lock:
            return [environment.tmp for environment in self._all]

    def _new(self) -> _Environment:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.spec.logical_id}: the engine has stopped")
            tmp = self._root / f"{self.spec.logical_id}-{len(self._all) + 1}"
            environment = _Environment(self.spec, self._environment, tmp, self._quiet, self._nice)
            self._all.append(environment)
            return environment

    def warm(self, count: int, *, wait: bool = True) -> None:
        """Start environments until there are ``count`` (at most ``limit``), all at once.

        ``wait=False`` returns at once: an invocation that takes an environment still starting
        waits for it.
        """
        fresh = [self._new() for _ in range(min(count, self.limit) - len(self.environments))]
        with self._lock:
            self._idle.extend(fresh)
        threads = [
            threading.Thread(target=_warm, args=(environment,), daemon=True)
            for environment in fresh
        ]
        for thread in threads:
            thread.start()
        for thread in threads if wait else ():
            thread.join()

    def invoke(self, payload: bytes) -> tuple[bytes, str | None]:
        """Run one invocation in an environment; returns the payload and ``FunctionError``."""
        with self._slots:
            with self._lock:
                environment = self._idle.pop() if self._idle else None
            if environment is None:
                environment = self._new()
            try:
                return environment.invoke(payload)
            finally:
                with self._lock:
                    if not self._closed:
                        self._idle.append(environment)

    def __call__(self, event: dict[str, Any], context: Any = None) -> Any:
        """Invoke with an event, as a handler is called; an error answer raises FunctionError."""
        result, function_error = self.invoke(json.dumps(event).encode())
        answer = json.loads(result)
        if function_error is not None:
            raise FunctionError(str(answer.get("errorType")), str(answer.get("errorMessage")))
        return answer

    def close(self) -> None:
        """Stop every environment and remove its /tmp."""
        with self._lock:
            self._closed = True
            environments, self._all, self._idle = self._all, [], []
        for environment in environments:
            environment.close()

"""The API function in worker processes: several requests answered at once, each on its own.

Powertools' resolver keeps the request it is answering on its class (``BaseRouter``), so two
requests in one process read each other's caller and route arguments; the handler therefore
answers one request at a time per process. Lambda runs one request per execution environment
and as many environments as there are requests; ``tilefan serve`` does the same with a pool of
warm processes, each loading the handler once and answering one request at a time. They reach
the engine's storage through its signed endpoint, with the engine's key, as the handler does
on Lambda through the role's.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tilefan.local.lambda_runtime import LambdaContext, LambdaFunction
from tilefan.local.template import FunctionSpec

__all__ = ["ApiProcesses"]

_function: LambdaFunction | None = None
"""The API function in this worker process (set by ``_start_worker``)."""


def _start_worker(spec: FunctionSpec, environment: Mapping[str, str]) -> None:
    global _function
    os.environ.clear()
    os.environ.update(environment)
    code_dir = str(spec.code_uri)
    if code_dir not in sys.path:  # as on Lambda, a handler imports its siblings
        sys.path.append(code_dir)
    _function = LambdaFunction(spec, None)
    _function.handler()  # load it now: the process is warm before its first request


def _answer(event: dict[str, Any]) -> dict[str, Any]:
    assert _function is not None, "the worker was not started"
    spec = _function.spec
    context = LambdaContext(
        function_name=spec.logical_id,
        invoked_function_arn=spec.arn,
        memory_limit_in_mb=spec.memory_mb,
        timeout_s=spec.timeout_s,
    )
    answer: dict[str, Any] = _function.handler()(event, context)
    return answer


def _ready() -> int:
    return os.getpid()


class ApiProcesses:
    """A pool of warm processes that each run the API handler; call it with a proxy event."""

    def __init__(self, spec: FunctionSpec, environment: Mapping[str, str], count: int) -> None:
        if count < 1:
            raise ValueError("at least one API process is needed")
        self._pool = ProcessPoolExecutor(
            max_workers=count,
            # spawn: a fork would copy the engine's threads and locks mid-use
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(spec, dict(environment)),
        )
        self.count = count
        # Start every process now, so no request waits for a cold start.
        pids = {future.result() for future in [self._pool.submit(_ready) for _ in range(count)]}
        if not pids:
            raise RuntimeError("no API process started")

    def __call__(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        answer: dict[str, Any] = self._pool.submit(_answer, event).result()
        return answer

    def close(self) -> None:
        """Stop the processes (requests in flight are answered first)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

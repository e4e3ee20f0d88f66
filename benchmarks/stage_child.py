"""One Lambda invocation in this process: load the template's handler, run it, measure it.

Reads the event as JSON on stdin. Everything it needs (endpoint, bucket, table, settings) is in
the environment the embedded engine set, as Lambda's would be.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any

from benchmarks._child import ROOT, write_result

__all__: list[str] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("function")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    event = json.loads(sys.stdin.read())
    report: dict[str, Any] = {"function": args.function}

    started = time.monotonic()
    if "TILEFAN_BENCH_VIPS_CACHE_MAX" in os.environ:  # an experiment's knob, not a setting
        import pyvips

        pyvips.cache_set_max(int(os.environ["TILEFAN_BENCH_VIPS_CACHE_MAX"]))
    from tilefan.local.engine import load_template

    spec = load_template(ROOT).functions[args.function]
    module_file, _, attribute = spec.handler.rpartition(".")
    sys.path.insert(0, str(spec.code_uri))  # as on Lambda, a handler imports its siblings
    module_spec = importlib.util.spec_from_file_location(
        f"handler_{args.function}", spec.code_uri / f"{module_file}.py"
    )
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    handler = getattr(module, attribute)
    from benchmarks.memwatch import PeakMemory
    from tilefan.local.engine import LambdaContext

    # What a cold start spends importing and building clients, on this machine.
    report["init_s"] = time.monotonic() - started
    context = LambdaContext(
        function_name=spec.logical_id,
        invoked_function_arn=spec.arn,
        memory_limit_in_mb=spec.memory_mb,
        timeout_s=spec.timeout_s,
    )
    sampler = PeakMemory().start()
    traced = _PythonPeak() if "TILEFAN_BENCH_TRACEMALLOC" in os.environ else None
    began, cpu_began = time.monotonic(), time.process_time()
    try:
        report["response"] = handler(event, context)
    except Exception as e:  # reported to the parent, which fails the invocation
        report["error"] = f"{type(e).__name__}: {e}"
    if traced is not None:
        report["python_memory"] = traced.stop()
    report["handler_s"] = time.monotonic() - began
    cpu_s = time.process_time() - cpu_began
    report["memory"] = sampler.stop()
    # The process's own CPU (every thread) less the sampler's, which grows with the wall:
    # what the handler did, apart from its waits on storage, which in the engine include
    # moto's server-side copies.
    report["handler_cpu_s"] = cpu_s - sampler.cpu_s
    write_result(args.result, report)


class _PythonPeak:
    """An experiment's knob: Python's own allocations (tracemalloc), their peak, and where the
    largest were at the highest point seen, every half second."""

    def __init__(self) -> None:
        import threading
        import tracemalloc

        tracemalloc.start(8)
        self.highest = 0
        self.lines: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import tracemalloc

        while not self.stopped.wait(0.5):
            current, _ = tracemalloc.get_traced_memory()
            if current > self.highest * 1.1:
                self.highest = current
                top = tracemalloc.take_snapshot().statistics("traceback")[:8]
                self.lines = [
                    f"{stat.size / 2**20:.1f} MiB in {stat.count}: "
                    + " < ".join(
                        f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"
                        for frame in stat.traceback
                    )
                    for stat in top
                ]

    def stop(self) -> dict[str, Any]:
        import tracemalloc

        self.stopped.set()
        self.thread.join()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"peak_mb": peak / 2**20, "largest_at_highest_seen": self.lines}


if __name__ == "__main__":
    main()

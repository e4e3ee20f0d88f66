"""Peak memory of the current process, read from the kernel and sampled in a thread.

``VmHWM`` is the kernel's exact high-water mark of resident memory, but it counts file-backed
pages too: libvips maps its ``.v`` scratch files, and every page of them it touches is resident
while mapped, however little of it the process holds on the heap. So the sampler also tracks
``RssAnon`` (heap, stacks, pixel buffers), which is what grows if a stage holds pixels in memory.
Both are reported; the sampled peak can miss a spike shorter than the interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["PeakMemory", "status_kb", "watch"]

MB = 1024 * 1024


def status_kb() -> dict[str, int]:
    """The memory fields of ``/proc/self/status``, in kB."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    fields[name] = int(rest.split()[0])
    except OSError:  # not Linux: no figures rather than wrong ones
        pass
    return fields


class PeakMemory:
    """Samples resident memory every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.baseline = status_kb()
        self.peak_anon_kb = self.baseline.get("RssAnon", 0)
        self.peak_file_kb = self.baseline.get("RssFile", 0)
        self.peak_rss_kb = self.baseline.get("VmRSS", 0)
        self.cpu_s = 0.0
        """The sampler's own CPU time, known once stopped (a process's CPU less this is the
        measured code's)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        now = status_kb()
        self.peak_anon_kb = max(self.peak_anon_kb, now.get("RssAnon", 0))
        self.peak_file_kb = max(self.peak_file_kb, now.get("RssFile", 0))
        self.peak_rss_kb = max(self.peak_rss_kb, now.get("VmRSS", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self.cpu_s = time.thread_time()

    def start(self) -> PeakMemory:
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the figures in MB."""
        self._stop.set()
        self._thread.join()
        self._sample()
        hwm = status_kb().get("VmHWM", self.peak_rss_kb)
        return {
            "baseline_rss_mb": round(self.baseline.get("VmRSS", 0) / 1024, 1),
            "baseline_anon_mb": round(self.baseline.get("RssAnon", 0) / 1024, 1),
            "peak_rss_mb": round(max(hwm, self.peak_rss_kb) / 1024, 1),
            "peak_anon_mb": round(self.peak_anon_kb / 1024, 1),
            "peak_file_mb": round(self.peak_file_kb / 1024, 1),
            "peak_anon_over_baseline_mb": round(
                (self.peak_anon_kb - self.baseline.get("RssAnon", 0)) / 1024, 1
            ),
        }


@contextmanager
def watch(result: dict[str, Any], interval: float = 0.01) -> Iterator[None]:
    """Measure the block's peak memory into ``result["memory"]``."""
    sampler = PeakMemory(interval).start()
    try:
        yield
    finally:
        result["memory"] = sampler.stop()

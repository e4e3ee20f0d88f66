"""What the results were measured on: the machine, its load, and the versions that matter."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

__all__ = ["describe_machine", "load_average"]

_PACKAGES = ("pyvips", "pyvips-binary", "moto", "boto3", "dask", "dask-image", "numpy", "tifffile")


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: read ratios, not times)."""
    return [round(value, 2) for value in os.getloadavg()]


def describe_machine() -> dict[str, Any]:
    """CPU, memory, OS, Python, libvips and package versions."""
    import psutil  # type: ignore[import-untyped, unused-ignore]
    import pyvips

    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
        "vips_concurrency": pyvips.vips_lib.vips_concurrency_get(),
        "packages": versions,
        "load_average_at_start": load_average(),
    }

"""The benchmark harness: tilefan against whole-image libvips and dask-image, and a Lambda model.

Run ``python -m benchmarks`` (``make bench``) for the quick profile, ``--full`` for the 500 MP and
1 GP runs. Results land in ``benchmarks/results/``; see ``docs/benchmarks.md``.
"""

from __future__ import annotations

__all__: list[str] = []

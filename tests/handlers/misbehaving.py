"""Handlers that misbehave as a Lambda function can, for tests of the engine's limits.

A test deploys them in place of a template function (``EmbeddedEngine(function_properties=
{"SplitterFunction": {"CodeUri": "tests/handlers/", "Handler": "misbehaving.splitter"}})``), so
they run in that function's worker processes with its variables and limits. ``splitter`` and
``tile_worker`` are the real handlers, made to misbehave while the bucket holds ``test/hold``
(its body says which and how: ``split sleep``, ``tile allocate``); ``probe`` does what its
event asks. Each answers ``{"environ": true}`` with the variables it sees.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3

import tilefan.stages.process
import tilefan.stages.split

HOLD = "test/hold"
FINALLY = "test/finally-ran"
"""Written by a ``finally`` block that a killed invocation never reaches."""
_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _s3() -> Any:
    return boto3.client("s3")


@functools.cache
def _real(code_dir: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"real_{code_dir}", _ROOT / code_dir / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _held(stage: str) -> str | None:
    """How ``stage`` (``split`` or ``tile``) misbehaves: ``test/hold`` says ``<stage> <how>``."""
    try:
        body: bytes = _s3().get_object(Bucket=os.environ["TILEFAN_BUCKET"], Key=HOLD)["Body"].read()
    except _s3().exceptions.NoSuchKey:
        return None
    held, how = body.decode().split()
    return how if held == stage else None


def _misbehave(how: str | None) -> None:
    """Write to the environment's /tmp, then sleep, allocate or fill it (with a finally) when
    told how, else nothing. No stage writes to /tmp any more: this stands in for one that did."""
    if how is None:
        return
    scratch = Path(tempfile.gettempdir())
    (scratch / "partial.tif").write_bytes(b"\0" * 2**20)
    try:
        if how == "sleep":
            time.sleep(3600)
        for number in itertools.count() if how == "fill" else ():
            (scratch / f"fill-{number}").write_bytes(b"\0" * 2**20)
            time.sleep(0.05)
        held = []
        while True:  # pages written, not only reserved: resident memory grows
            held.append(b"\1" * 32 * 2**20)
    finally:
        _s3().put_object(Bucket=os.environ["TILEFAN_BUCKET"], Key=FINALLY, Body=b"")


_real_transcode = tilefan.stages.split.transcode
_real_execute_tile = tilefan.stages.process.execute_tile


def _transcode(*args: Any) -> Any:
    _misbehave(_held("split"))
    return _real_transcode(*args)


def _execute_tile(chain: Any, spec: Any, block: Any, out: Any) -> Any:
    if (out.x, out.y) == (2 * 64, 64):  # tile 7 of a 5 x 4 grid of 64 px
        _misbehave(_held("tile"))
    return _real_execute_tile(chain, spec, block, out)


def splitter(event: dict[str, Any], context: Any) -> Any:
    """The real splitter; its transcode misbehaves while the bucket holds ``test/hold``."""
    if event.get("environ"):
        return dict(os.environ)
    tilefan.stages.split.transcode = _transcode
    return _real("splitter").lambda_handler(event, context)


def tile_worker(event: dict[str, Any], context: Any) -> Any:
    """The real tile worker; tile 7 misbehaves while the bucket holds ``test/hold``."""
    if event.get("environ"):
        return dict(os.environ)
    tilefan.stages.process.execute_tile = _execute_tile
    return _real("tile_worker").lambda_handler(event, context)


def probe(event: dict[str, Any], context: Any) -> Any:
    """``{"environ": true}``: the variables it sees; ``{"misbehave": how}``: sleep or allocate."""
    if event.get("environ"):
        return dict(os.environ)
    _misbehave(str(event["misbehave"]))
    return None

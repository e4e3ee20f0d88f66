"""Fuzzing the operation-chain validator: any JSON-like value is a chain or an `InvalidChain`.

`parse_chain` is the first thing a request's operations meet (the API and the CLI call it before
anything is stored), so whatever a caller sends must end in a `Chain` or in `InvalidChain` with
a sentence, never in another exception, never in a hang. A chain it accepts must also survive
the trip through the job record: strict JSON out and back to the same chain.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilefan import Chain, InvalidChain, operation_names, parse_chain
from tilefan.imaging.operations import MAX_CHAIN_LENGTH
from tilefan.service.job_service import JobService
from tilefan.settings import Settings

pytestmark = pytest.mark.unit

EXAMPLES = int(os.environ.get("TILEFAN_CHAIN_FUZZ_EXAMPLES", "300"))
"""Examples per property; CI's budget. Raise it for a longer run."""

HANG_SECONDS = 30
"""A call this long is a hang, not a slow call: parse_chain takes milliseconds."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # wall-clock limits are noise on a shared machine; the watchdog finds hangs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextmanager
def watchdog(seconds: int) -> Iterator[None]:
    """Fail the example instead of hanging the run when a call does not return."""

    def expire(signum: int, frame: Any) -> None:
        raise AssertionError(f"parse_chain did not return within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# JSON as Python's json module reads it, which is what the API hands the validator: it also
# reads NaN and Infinity, so those are in.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=40,
)

# Values near what a caller means: a real operation name, real field names, wild values.
FIELDS = [
    "sigma", "min_ampl", "precision", "size", "mask", "scale", "offset", "angle", "direction",
    "hshrink", "vshrink", "vscale", "kernel", "a", "b", "uchar", "exponent", "space",
    "background", "value", "x1", "y2", "y3", "m1", "m2",
]  # fmt: skip
floats = st.floats(allow_nan=True, allow_infinity=True)
near_values = (
    scalars
    | st.lists(floats, max_size=5)
    | st.lists(st.lists(floats | st.integers(), max_size=17), max_size=17)
    | st.sampled_from(["d90", "d180", "d270", "horizontal", "vertical", "integer", "float",
                       "lanczos3", "nearest", "srgb", "b-w", "lab"])
)  # fmt: skip
near_steps = st.builds(
    lambda op, params: {"op": op, **params},
    st.sampled_from(operation_names()) | st.text(max_size=10),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), near_values, max_size=4),
)
near_chains = st.lists(near_steps | json_values, max_size=MAX_CHAIN_LENGTH + 2)


def check(value: Any) -> None:
    """The property: a chain that round-trips through the job record, or InvalidChain."""
    with watchdog(HANG_SECONDS):
        try:
            chain = parse_chain(value)
        except InvalidChain as refused:
            sentence = str(refused).strip()
            assert sentence, "InvalidChain without a sentence"
            return
    assert isinstance(chain, Chain)
    # What the job record keeps and GET /jobs/{id} answers: strict JSON, so no NaN or Infinity.
    stored = json.dumps(chain.to_json(), allow_nan=False)
    assert parse_chain(json.loads(stored)) == chain


@FUZZ
@given(json_values)
def test_any_json_value_is_a_chain_or_invalid_chain(value: Any) -> None:
    check(value)


@FUZZ
@given(near_chains)
def test_steps_with_real_names_and_wild_parameters_are_a_chain_or_invalid_chain(
    steps: list[Any],
) -> None:
    check(steps)


class _NoJobs:
    """A job table that must not be reached: refused requests are refused before it."""

    def new_job(self, **fields: Any) -> Any:
        return SimpleNamespace(job_id="stored", **fields)


def service() -> JobService:
    return JobService(Settings(), jobs=_NoJobs(), store=None, stepfunctions=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        [{"op": "threshold", "value": math.nan}],
        [{"op": "linear", "a": math.inf}],
        [{"op": "linear", "a": [1.0, -math.inf], "b": 0}],
        [{"op": "conv", "mask": [[1.0, math.nan]]}],
        [{"op": "conv", "mask": [[1.0]], "scale": math.nan}],
        [{"op": "flatten", "background": [math.inf]}],
    ],
    ids=lambda value: json.dumps(value),
)
def test_non_finite_numbers_are_refused_naming_the_step(value: list[dict[str, Any]]) -> None:
    # JSON has no NaN or Infinity, but Python's reader (and so the API's) accepts them; a job
    # holding one would answer GET /jobs/{id} with text that is not JSON.
    with pytest.raises(InvalidChain) as refused:
        service().create("caller", value, "png")
    message = str(refused.value)
    assert f"step 0 ({value[0]['op']})" in message and "finite number" in message


def test_finite_chains_are_created() -> None:
    job = service().create("caller", [{"op": "linear", "a": 2, "b": -1.5}], "png")
    assert job.operations[0]["a"] == 2.0


def test_deeply_nested_values_are_refused_not_a_recursion_error() -> None:
    nested: Any = {"op": "invert"}
    for _ in range(2000):
        nested = [nested]
    with pytest.raises(InvalidChain):
        parse_chain([nested])
    with pytest.raises(InvalidChain):
        parse_chain([{"op": "linear", "a": nested}])

"""What a failed job says: a named code for a known error, the error itself for a bug."""

from __future__ import annotations

import json

import pytest

from tilefan.stages.abort import describe_failure

pytestmark = pytest.mark.unit


def _lambda_error(error_type: str, message: str) -> dict[str, str]:
    """A Step Functions error as a Catch hands it on from a Lambda task."""
    cause = json.dumps({"errorType": error_type, "errorMessage": message})
    return {"Error": error_type, "Cause": cause}


def test_a_known_error_gets_its_code_and_sentence() -> None:
    code, message = describe_failure(_lambda_error("InvalidChain", "no such operation: blur"))
    assert (code, message) == ("INVALID_CHAIN", "no such operation: blur")


def test_an_unexpected_error_says_its_type_and_message() -> None:
    """A bug (here Python's ``struct.error``, whose class is named ``error``) is an internal
    error that says what failed, not only its class name."""
    failure = _lambda_error("error", "'I' format requires 0 <= number <= 4294967295")
    code, message = describe_failure(failure)
    assert code == "INTERNAL_ERROR"
    assert message == (
        "the job stopped on an internal error "
        "(error: 'I' format requires 0 <= number <= 4294967295)"
    )


def test_a_message_of_several_lines_is_told_in_one() -> None:
    failure = _lambda_error("Error", "unable to call thing\n  VipsImage: bad\n")
    assert describe_failure(failure)[1] == (
        "the job stopped on an internal error (Error: unable to call thing VipsImage: bad)"
    )


def test_a_long_message_is_shortened_and_nothing_is_still_described() -> None:
    code, message = describe_failure(_lambda_error("KeyError", "x" * 5000))
    assert code == "INTERNAL_ERROR" and len(message) < 400 and message.endswith("...)")
    assert describe_failure(None) == (
        "INTERNAL_ERROR",
        "the job stopped on an internal error (unknown)",
    )

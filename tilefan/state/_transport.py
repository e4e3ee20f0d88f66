"""botocore's own errors, raised when a request or its answer did not get through.

`ClientError` is an answer from the service; these are the network failing under it: a
connection that could not be made or was closed, a read that timed out, a body cut short or
corrupted on the way. Each is worth retrying, so the adapters turn them into `TransientError`,
which the state machine retries; every other botocore error (a bad parameter, no credentials) is
a bug or a misconfiguration that retrying cannot fix.
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
)

from tilefan.errors import TilefanError, TransientError

__all__ = ["AWS_ERRORS", "translate_transport"]

AWS_ERRORS = (ClientError, BotoCoreError)
"""What a boto3 call raises: the service's answer, or botocore's own failure."""

_TRANSPORT_ERRORS = (ConnectionError, HTTPClientError, IncompleteReadError, FlexibleChecksumError)
"""Connection and connect-timeout errors; read timeouts, closed connections and streaming
errors (`HTTPClientError`); bodies shorter than their length; bodies failing their checksum."""


def translate_transport(error: BotoCoreError, service: str) -> TilefanError:
    """`TransientError` for a failure of the network, `TilefanError` for any other."""
    if isinstance(error, _TRANSPORT_ERRORS):
        return TransientError(f"{service} did not answer ({type(error).__name__}: {error})")
    return TilefanError(f"{service} could not be called ({type(error).__name__}: {error})")

"""How the `tilefan` command fails: every error becomes one line on stderr with a code.

The command's promise is that a user never sees a traceback: `guarded` runs a subcommand and
turns whatever it raises into ``error: CODE: sentence`` and an exit status, and `OneLineParser`
makes argparse's own refusals take the same shape.
"""

from __future__ import annotations

import argparse
import logging
import sys
import urllib.error
from collections.abc import Callable
from typing import NoReturn

from tilefan.errors import TilefanError, reason

__all__ = [
    "ApiUnreachable",
    "CannotListen",
    "InputMissing",
    "InvalidConcurrency",
    "InvalidOpsFile",
    "NoBenchmarks",
    "NoOperations",
    "OneLineParser",
    "OutputUnwritable",
    "UnknownFormat",
    "UsageError",
    "code_and_sentence",
    "fail",
    "guarded",
    "route_handler_logs",
]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command stopped with Ctrl-C."""


class UsageError(TilefanError):
    """The command line itself is wrong: an unknown flag, a missing argument."""

    code = "USAGE"


class InputMissing(TilefanError):
    """The input file named on the command line does not exist."""

    code = "INPUT_MISSING"


class UnknownFormat(TilefanError):
    """The output's extension names no format and --format was not given."""

    code = "UNKNOWN_FORMAT"


class NotOneFile(TilefanError):
    """`submit` downloads one file; a DeepZoom or IIIF folder of tiles is not one."""

    code = "UNSUPPORTED_OUTPUT"


class OutputUnwritable(TilefanError):
    """The output cannot be written where it is named: checked before a job starts."""

    code = "OUTPUT_UNWRITABLE"


class InvalidOpsFile(TilefanError):
    """--ops-file is missing, unreadable, or not a JSON list."""

    code = "INVALID_OPS_FILE"


class NoOperations(TilefanError):
    """Neither --op nor --ops-file: a job with no steps only re-encodes, so it must be asked for."""

    code = "NO_OPERATIONS"


class InvalidConcurrency(TilefanError):
    """--concurrency is outside what the embedded engine runs."""

    code = "INVALID_CONCURRENCY"


class ApiUnreachable(TilefanError):
    """No answer from the API's address: a wrong URL, or the server is down."""

    code = "API_UNREACHABLE"


class NoBenchmarks(TilefanError):
    """`tilefan bench` outside a checkout: the harness is not in the wheel."""

    code = "NO_BENCHMARKS"


class CannotListen(TilefanError):
    """`tilefan serve` cannot bind its address."""

    code = "CANNOT_LISTEN"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a refusal is a `UsageError` (one line, like every other failure)."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage block and exiting."""
        raise UsageError(f"{message} (see {self.prog} --help)")


def code_and_sentence(error: BaseException) -> tuple[str, str]:
    """The code and the sentence a user reads for any error."""
    if isinstance(error, TilefanError):
        # The client's ApiError keeps the API's own sentence apart from its code.
        return error.code, str(getattr(error, "message", error))
    if isinstance(error, urllib.error.URLError):
        return ApiUnreachable.code, f"the API cannot be reached: {error.reason}"
    if isinstance(error, KeyboardInterrupt):
        return "INTERRUPTED", "stopped by the user"
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return "IO_ERROR", f"{where}{error.strerror}"
    return "INTERNAL_ERROR", f"{type(error).__name__}: {reason(error)}"


def _exit_status(error: BaseException) -> int:
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def fail(code: str, sentence: str) -> None:
    """Print the one line a failure shows."""
    print(f"error: {code}: {sentence}", file=sys.stderr)


def guarded(command: Callable[[], int]) -> int:
    """Run ``command``; any error it raises becomes one line on stderr and an exit status."""
    try:
        return command()
    except SystemExit:
        raise  # --help and --version end the command on purpose
    except BaseException as e:
        fail(*code_and_sentence(e))
        return _exit_status(e)


def route_handler_logs(service: str, *, verbose: bool) -> None:
    """The Lambda handlers' Powertools logs in a CLI run: on stderr with -v, else nowhere.

    On Lambda the handlers' `Logger()` writes JSON lines to stdout for CloudWatch; on the
    command line stdout is the user's. Powertools configures a service's logger once and later
    `Logger()`s reuse it, so configuring it here first decides where the handlers' lines go.
    """
    from aws_lambda_powertools import Logger

    Logger(service=service, stream=sys.stderr)
    # Handlers, not the logger: the core's module loggers ("tilefan.stages...") propagate here.
    for handler in logging.getLogger(service).handlers:
        if isinstance(handler, logging.StreamHandler):
            # The current stderr, also on a second run in one process. Not setStream: that
            # flushes the previous stream, which may be closed by now.
            handler.stream = sys.stderr
        handler.setLevel(logging.NOTSET if verbose else logging.CRITICAL + 1)

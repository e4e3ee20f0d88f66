"""Limits a request body must keep before anything parses it."""

from __future__ import annotations

import re

__all__ = ["MAX_JSON_DEPTH", "nests_too_deep"]

MAX_JSON_DEPTH = 32
"""The deepest body the API reads: its own documents nest 5 levels (a `conv` mask in a step in
the operations); recursive parsers and validators fail far deeper, at Python's recursion limit."""

_ESCAPE = re.compile(r"\\.")
_STRING = re.compile(r'"[^"]*"')
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


def nests_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``text`` nests arrays and objects deeper than ``limit`` (or never closes).

    Regular expressions, not a parser: escapes and strings are dropped, then innermost bracket
    pairs are removed ``limit`` times; brackets left over nest deeper (or are unbalanced, which
    JSON refuses anyway).
    """
    brackets = _NOT_A_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    for _ in range(limit):
        if not brackets:
            return False
        brackets, removed = _INNERMOST.subn("", brackets)
        if not removed:
            break
    return bool(brackets)

"""Plain text for messages: the first line of an error, shown to the user on one line."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

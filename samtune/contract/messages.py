"""Plain text for messages: the first line of an error, shown to the user on one line, and
addresses with their credentials masked.

>>> masked("sweep at http://alice:s3cret@mlflow.example:5000/ failed")
'sweep at http://alice:***@mlflow.example:5000/ failed'
>>> masked("https://token@host/x and sqlite:///tmp/mlflow.db")
'https://***@host/x and sqlite:///tmp/mlflow.db'
"""

from __future__ import annotations

import re

# scheme://user:password@ or scheme://token@ in an address; the part before '@' is a secret.
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]+)(?::[^/\s@]*)?@")


def masked(text: str) -> str:
    """``text`` with the password (or the lone token) of every URL in it replaced by ``***``:
    what a message, log line, tag or printed command may show of a tracking URI."""

    def hide(m: re.Match[str]) -> str:
        if ":" in m.group(0)[len(m.group("scheme")) :]:
            return f"{m.group('scheme')}{m.group('user')}:***@"
        return f"{m.group('scheme')}***@"

    return _CREDENTIALS.sub(hide, text)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

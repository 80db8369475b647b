"""The value-spec language of every setting: what it accepts (kind, None allowed, choices,
bounds), how a value given in Python is checked and how one given on the command line is parsed.

`Setting` is the one description a trial key (`samtune.contract.keys.TRIAL_KEYS`) and a `Sweep`
field share. A bad value raises `SpaceError` (a ValueError) with a one-line message naming the
setting and what it expects.
"""

from __future__ import annotations

import ast
import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


class SpaceError(ValueError):
    """A mistake in a search space file, an override or a trial config; the message is one line."""


def suggest(value: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Setting:
    """What one setting accepts: a kind, optional None, choices, bounds and an extra check."""

    kind: str  # "int" | "float" | "str" | "bool"
    optional: bool = False  # None allowed
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    low: float | None = None  # lower bound
    low_open: bool = False  # value must be > low (else >= low)
    high: float | None = None  # upper bound
    high_open: bool = False  # value must be < high (else <= high)
    check: Callable[[str, Any], None] | None = None
    doc: str = ""
    default: Any = None  # a trial key's default (what the trainer uses)

    def expected(self) -> str:
        kind = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False", "any": "a value"}[
            self.kind
        ]
        if self.choices is not None:
            kind = f"one of {list(self._choices())}"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = kind + (" " + " and ".join(bounds) if bounds else "")
        return text + (" or None" if self.optional else "")

    def _choices(self) -> tuple[str, ...]:
        return self.choices() if callable(self.choices) else tuple(self.choices or ())

    def validate(self, key: str, value: Any) -> Any:
        """Return ``value`` normalised (ints accepted where floats are); raise SpaceError if bad."""
        if value is None:
            if self.optional:
                return None
            raise SpaceError(f"{key}=None: expected {self.expected()}")
        if self.kind == "any":
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise SpaceError(f"{key}={value!r}: expected True or False, got {type(value).__name__}")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise SpaceError(f"{key}={value!r}: expected {self.expected()}, got {type(value).__name__}")
            if self.choices is not None and value not in self._choices():
                raise SpaceError(
                    f"{key}={value!r}: expected one of {list(self._choices())}" + suggest(value, self._choices())
                )
            if self.check is not None:
                self.check(key, value)
            return value
        # Numbers. bool is an int subclass in Python; a True where a number belongs is a mistake.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpaceError(f"{key}={value!r}: expected {self.expected()}, got {type(value).__name__}")
        if self.kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise SpaceError(f"{key}={value!r}: expected {self.expected()}")
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise SpaceError(f"{key}={value!r}: expected a finite number")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise SpaceError(f"{key}={value!r}: expected {self.expected()}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise SpaceError(f"{key}={value!r}: expected {self.expected()}")
        return value

    def parse(self, key: str, raw: str) -> Any:
        """Parse a command-line string into this kind, then validate it."""
        text = raw.strip()
        if self.optional and text.lower() in ("none", "null"):
            return None
        if self.kind == "any":
            # A literal where it reads as one (3, 0.1, True, (1, 2)), else the text itself.
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        if self.kind == "bool":
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise SpaceError(f"{key}={raw}: expected true or false")
        if self.kind == "int":
            try:
                value: Any = int(text)
            except ValueError:
                raise SpaceError(f"{key}={raw}: expected {self.expected()}") from None
        elif self.kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise SpaceError(f"{key}={raw}: expected {self.expected()}") from None
        else:
            value = text
        return self.validate(key, value)


def choice(*options: str, doc: str = "") -> Setting:
    return Setting("str", choices=tuple(options), doc=doc)

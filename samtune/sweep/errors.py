"""The errors a sweep gives its user: it cannot start (`SweepError`), or it stopped before its
end (`SweepInterrupted`, which ``--resume`` finishes).
"""

from __future__ import annotations


class SweepError(ValueError):
    """A sweep that cannot start: bad storage, unreachable services, nothing to resume."""


class SweepInterrupted(RuntimeError):
    """The sweep was interrupted; ``samtune sweep FILE --resume`` finishes it."""

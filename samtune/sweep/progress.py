"""Where a sweep is: each stage's runs and epochs done out of its total, and the time left.

The time left is the stage's epochs still to run at the pace its epochs have run so far in this
driver. Epochs of different runs cost differently (SAM at small m several times SGD's), so it is
an estimate, said as one ("about"). It is an upper bound ("at most") where the pace can only
get better: in a search with early stopping, whose total is the budget's, which stopped trials
never reach; and in a confirmation round, whose costliest runs start first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``, ``3d04h``.

    >>> duration(45), duration(185), duration(3720), duration(3 * 86400 + 4 * 3600)
    ('45s', '3m05s', '1h02m', '3d04h')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days:,}d{hours:02d}h"


@dataclass
class StageProgress:
    """One stage of a sweep (the search, a confirmation round): what has run of it, and when it
    should end."""

    name: str
    runs: int
    epochs: int  # the stage's whole budget, in trial-epochs
    #: The pace so far is the stage's slowest (early stopping may end it sooner than its budget,
    #: or its costliest runs go first): the time left is an upper bound.
    upper_bound: bool = False
    unit: str = "runs"
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=-1.0)
    runs_ended: int = 0
    epochs_done: int = 0

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    def epoch_done(self) -> None:
        self.epochs_done += 1

    def run_ended(self, epochs_left: int = 0) -> None:
        """A run ended; `epochs_left`: the budget's epochs it will never run (stopped early)."""
        self.runs_ended += 1
        self.epochs -= max(0, epochs_left)

    def seconds_left(self) -> float | None:
        """At this driver's pace so far; None before the first epoch."""
        if self.epochs_done == 0:
            return None
        elapsed = self.clock() - self.started
        return elapsed / self.epochs_done * max(0, self.epochs - self.epochs_done)

    def text(self) -> str:
        elapsed = self.clock() - self.started
        line = (
            f"{self.name}: {self.runs_ended}/{self.runs} {self.unit} ended, "
            f"{self.epochs_done}/{self.epochs} epochs, {duration(elapsed)} in"
        )
        if self.runs_ended >= self.runs:
            return line + ", done"
        left = self.seconds_left()
        if left is None:
            return line + ", time left: after the first epoch"
        bound = "at most" if self.upper_bound else "about"
        return line + f", {bound} {duration(left)} left"

"""Ctrl-C during a sweep, wherever it lands.

All cells of a sweep run under one ``Tuner.fit()``. Inside it Tune installs its own SIGINT
handler: a Ctrl-C sets an event that ends Tune's loop once the experiment state is saved (the
trials left unfinished are what ``--resume`` continues), and puts back the handler that was there
before. Two Ctrl-Cs would be lost to that handler. Tune never puts the old handler back when no
signal came, so after ``fit()`` returns a stale Tune handler would catch a Ctrl-C while the
driver reconciles its records with Tune's saved state, and set an event nobody reads any more;
and a Ctrl-C after Tune's loop ended but before ``fit()`` returned is caught the same way.

`InterruptWatch` is installed for the length of the sweep. Outside ``fit()`` (while the Tuner is
built, and from the moment `tune_fit` puts it back after ``fit()``) its own handler raises
`KeyboardInterrupt` as Python's default does; and `interrupted` records that a Ctrl-C came,
whichever handler caught it.

SIGTERM (what `kill`, systemd, Kubernetes and Slurm send first) is a Ctrl-C too: the watch turns
it into a SIGINT to this process, so whichever SIGINT handler is in place saves the sweep and it
ends with the resume command, instead of Ray's own SIGTERM handler tearing the driver down.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class InterruptWatch:
    """Installed for the length of a sweep (a context manager); `interrupted` is set once a
    SIGINT arrived, whether Tune or this watch caught it."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None
        self._previous_term: Callable[[int, FrameType | None], Any] | int | None = None
        self._active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    @staticmethod
    def _terminate(signum: int, frame: FrameType | None) -> None:
        signal.raise_signal(signal.SIGINT)

    def install(self) -> InterruptWatch:
        # Signals go to the main thread only; elsewhere (a notebook's worker thread) there is
        # nothing to install and Python's own behaviour stays.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            self._previous_term = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGINT, self._handle)
            signal.signal(signal.SIGTERM, self._terminate)
            self._active = True
        return self

    def remove(self) -> None:
        """Put back the handlers found at `install`."""
        if self._active:
            signal.signal(signal.SIGINT, self._previous)
            signal.signal(signal.SIGTERM, self._previous_term)
            self._active = False

    def __enter__(self) -> InterruptWatch:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextmanager
    def tune_fit(self) -> Iterator[InterruptWatch]:
        """Around the sweep's ``Tuner.fit()``: afterwards, `interrupted` tells whether a SIGINT came
        while Tune's handler was installed, and this watch's handler is back in place."""
        try:
            yield self
        finally:
            # With TUNE_DISABLE_SIGINT_HANDLER Tune leaves ours in place, and ours raises.
            tune_catches = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0)
            if self._active:
                if tune_catches and signal.getsignal(signal.SIGINT) == self._handle:
                    # Tune's handler ran: it restores the handler it found, which was ours.
                    self.interrupted = True
                else:
                    signal.signal(signal.SIGINT, self._handle)

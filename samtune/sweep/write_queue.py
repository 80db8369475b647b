"""The queue of records on their way to MLflow, so that training never waits on the store.

Writes go through a queue that a background thread drains (``background=True``, what a sweep
uses), so the Tune loop never waits on MLflow: each trial's report waits for the driver to take
the previous one, and a SQLite write costs about 15 ms per result (opening a new store about
2.5 s, which overlaps Ray's start). `WriteQueue.drain` writes from the calling thread and returns
once the queue is empty or a write failed. When the tracking server fails, training goes on: the
pending records stay queued and are written to the spool (`samtune.sweep.spool`), named in the
warning. They are retried on later writes, backing off from ``retry_after_s`` up to two minutes
between attempts, and once more at the end. Each attempt is bounded by short HTTP timeouts
(`samtune.sweep.store.fail_fast_environment`): the sweep never hangs on MLflow.

A write that timed out may still have reached the server, so the first metrics write to a run
after a failure asks the server which steps it already has before writing again. A record the
server refuses for good (an MLflow error such as ``INVALID_PARAMETER_VALUE``, e.g. a metric name
MLflow does not allow) would block every record behind it: it is set aside, with a warning, and
the queue goes on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from samtune.sweep.run_writes import RunWriter
from samtune.sweep.spool import Record, Spool, failure_text

# The tracker's warnings, under its name: one logger says what became of the records.
log = logging.getLogger("samtune.sweep.tracking")

# MLflow errors that a retry cannot fix: the record itself is refused.
PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST"})

MAX_BACKOFF_S = 120.0
# Pauses between the last attempts when a sweep ends: short first (a lock is often held for
# seconds), never so long that the store coming back goes unnoticed for long.
FIRST_PAUSE_S = 1.0
MAX_PAUSE_S = 15.0


def is_permanent(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and getattr(exc, "error_code", None) in PERMANENT


class WriteQueue:
    """Records in the order they were submitted, written by `writer` while `can_write()` holds,
    kept in `spool` while the store fails. `uri` (as messages show it: credentials masked) and
    `replay_hint` (the command that writes a left-over spool later) are named in the warning."""

    def __init__(
        self,
        writer: RunWriter,
        spool: Spool,
        can_write: Callable[[], bool],
        retry_after_s: float,
        uri: str,
        replay_hint: str | None,
    ):
        self.writer = writer
        self.spool = spool
        self.can_write = can_write
        self.retry_after_s = retry_after_s
        self.uri = uri
        self.replay_hint = replay_hint
        self.records: list[Record] = []
        # `lock` guards the records and the failure state; `writing` lets one drainer at a time
        # write, so records reach MLflow in the order they were submitted.
        self.lock = threading.Lock()
        self._writing = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_failure = 0.0
        self._backoff_s = retry_after_s
        self._warned = False
        self.failures = 0
        # The last failure, as a message shows it (`failure_text`): named while the end waits.
        self.last_failure = ""

    # -- the writer thread ----------------------------------------------------------------------
    def start(self, prepare: Callable[[], None]) -> None:
        """Drain from a thread of this queue's own, which first calls `prepare` (opens the store)."""
        self._thread = threading.Thread(target=self._serve, args=(prepare,), name="samtune-mlflow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the writer thread (what is left is written by the caller's `drain`)."""
        if self._thread is not None:
            with self._wake:
                self._closing = True
                self._wake.notify_all()
            self._thread.join()
            self._thread = None

    def _serve(self, prepare: Callable[[], None]) -> None:
        prepare()
        if not self.can_write():
            return  # the store could not be opened: nothing can be written
        while True:
            with self._wake:
                while not self._closing and (not self.records or self._backoff_left() > 0):
                    # During a back-off, wait it out (or until stop() asks for the end).
                    self._wake.wait(timeout=self._backoff_left() if self.records else None)
                if self._closing:
                    return  # stop() leaves what is left to its caller's thread
            self.drain()

    def _backoff_left(self) -> float:
        if not self.failures or not self._last_failure:
            return 0.0
        return max(0.0, self._backoff_s - (time.monotonic() - self._last_failure))

    # -- submitting and writing -----------------------------------------------------------------
    def submit(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)
            failed_lately = len(self.records) > 1 and time.monotonic() - self._last_failure < self._backoff_s
            if failed_lately:
                self.spool.write(self.records)  # the server failed a moment ago: don't stall the driver on every write
            # A writer thread that died (a bug, a full disk while spooling) leaves the writes to
            # the caller, as without one.
            if self._thread is not None and self._thread.is_alive():
                if not failed_lately:
                    self._wake.notify()
                return
        if not failed_lately:
            self.drain()

    def drain(self) -> bool:
        """Try to write everything queued, from this thread; True when nothing is left."""
        if not self.can_write():
            return False
        with self._writing:
            while True:
                with self.lock:
                    if not self.records:
                        break
                    record = self.records[0]
                try:
                    self.writer.apply(record)
                except Exception as exc:  # noqa: BLE001  any client/server error: keep it queued
                    self.writer.unsure.add(record.key)
                    with self.lock:
                        if is_permanent(exc):
                            self._reject(record, exc)
                            continue
                        self._failed(exc)
                    return False
                with self.lock:
                    self.records.pop(0)
            with self.lock:
                self._backoff_s = self.retry_after_s
                self._last_failure = 0.0  # no back-off once the server took everything
                self.spool.remove()  # everything reached the server after all
        return True

    def drain_within(self, seconds: float, waiting: Callable[[float, str], None]) -> bool:
        """Drain, retrying for up to `seconds` what the store does not take now (a SQLite file
        another process holds locked, a server restarting): True when nothing is left.
        `waiting(seconds left, why)` is called once, before the first pause."""
        deadline = time.monotonic() + seconds
        pause = FIRST_PAUSE_S
        while not self.drain():
            left = deadline - time.monotonic()
            if left <= 0 or not self.can_write():
                return False
            if pause == FIRST_PAUSE_S:
                waiting(left, self.last_failure)
            time.sleep(min(pause, left))
            pause = min(pause * 2, MAX_PAUSE_S)
        return True

    def _failed(self, exc: Exception) -> None:
        self.last_failure = failure_text(exc)
        if self.failures:  # failing again: wait longer before the next attempt
            self._backoff_s = min(MAX_BACKOFF_S, self._backoff_s * 2)
        self.failures += 1
        self._last_failure = time.monotonic()
        self.spool.write(self.records)
        if not self._warned:
            self._warned = True
            replay = f" (or later by `{self.replay_hint}`)" if self.replay_hint else ""
            log.warning(
                "MLflow at %s failed (%s); training goes on, records are kept in %s and retried%s",
                self.uri,
                failure_text(exc),
                self.spool.path,
                replay,
            )

    def _reject(self, record: Record, exc: Exception) -> None:
        """Set aside a record the server refuses for good, so the ones behind it get written."""
        self.records.remove(record)
        self.spool.set_aside(record, exc)
        if os.path.exists(self.spool.path):
            self.spool.write(self.records)  # the spool must not replay what was set aside

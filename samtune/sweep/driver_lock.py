"""One driver per sweep: a lock on the sweep's storage held exactly as long as its driver lives.

Two drivers of one sweep would both run every trial into the same folder and record them twice.
`fcntl.flock` is released by the kernel when the holding process ends, however it ends, so a
SIGKILLed driver never blocks the `--resume` that finishes its sweep, and no stale lock file
needs cleaning: the file stays, naming its last holder, and only the lock on it matters.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

from samtune.contract.messages import masked


class SweepBusy(ValueError):
    """Another live driver holds this sweep."""


class DriverLock:
    """Held from `acquire` until `release` or this process's end."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        # Closing the last descriptor drops the lock: when released, when this object is
        # collected (a refused sweep), or at exit, while `os` is still there to do it.
        self._close = weakref.finalize(self, os.close, fd)

    @classmethod
    def acquire(cls, storage: Path, name: str) -> DriverLock:
        """Lock sweep `name` under `storage`; raises `SweepBusy` naming the driver that holds it."""
        # Beside the sweep's folder, not in it: a sweep refused for any other reason leaves no
        # folder that a later run would take for a sweep to resume.
        path = storage / f".{name}.driver.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise SweepBusy(
                f"sweep {name!r} is already running ({holder}); wait for it to end, or stop it "
                f"and finish it with --resume"
            ) from None
        record = holder_record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        self._close()  # once; later calls do nothing


def holder_record() -> dict:
    """What a driver writes of itself where it holds a sweep (a lock file, a lease object)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "command": masked(" ".join(sys.argv)),
    }


def describe_holder(raw: bytes, unknown: str = "another driver, starting") -> str:
    """The driver a `holder_record` names, in words; `unknown` where it cannot be read."""
    try:
        rec = json.loads(raw.decode())
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["started"]))
        return f"driver pid {rec['pid']} on {rec['host']} since {when}"
    except (ValueError, KeyError, TypeError):
        return unknown  # e.g. it holds the lock but has not written itself yet

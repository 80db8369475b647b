"""An Optuna journal kept in object storage: the cells' studies of a sweep whose storage is a bucket.

A journal file in the driver's staging folder would reach the bucket only with the mirror's next
push, and a driver killed outright would leave the bucket a journal older than Tune's saved
searcher, which then names trials the journal lacks. Here each batch of journal entries is its
own object, ``<first entry's number>.jsonl``, written before the call returns: the bucket's
journal is never behind the searcher state Tune saves after it.

Only the sweep's driver (held by its lease) writes a sweep's journal, so for the driver entries
are read from the bucket once, when the journal is first opened, and kept in memory after that.
Every cell's searcher opens the same journal: `journal_at` gives them one shared object per URI
(unpickled searchers too), so their entries are numbered in one sequence.

A reader beside a running sweep (optuna-dashboard, `samtune studies`) opens it with
`watch_journal`: it writes nothing, and looks for the objects written since its last look at most
every few seconds, reading only those.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any

from optuna.storages.journal import BaseJournalBackend

from samtune.sweep.object_store import Bucket

_OPEN: dict[str, BucketJournal] = {}
_OPENING = threading.Lock()


#: How often a watching reader looks for new entries: about as often as optuna-dashboard re-reads.
WATCH_EVERY_S = 2.0


def journal_at(uri: str) -> BucketJournal:
    """This process's one journal at ``uri``, for the sweep's driver: its writer."""
    with _OPENING:
        if uri not in _OPEN:
            _OPEN[uri] = BucketJournal(uri)
        return _OPEN[uri]


def watch_journal(uri: str, every_s: float = WATCH_EVERY_S) -> BucketJournal:
    """A reader of the journal at ``uri`` that a sweep's driver may be writing: it refuses to write,
    and reads the entries written since its last look when `every_s` seconds have passed."""
    return BucketJournal(uri, watch_every_s=every_s)


class BucketJournal(BaseJournalBackend):
    """Optuna journal entries as objects under ``uri`` (e.g. ``s3://bucket/sweeps/<sweep>/optuna-journal``);
    open it with `journal_at` (the writer) or `watch_journal` (a reader)."""

    def __init__(self, uri: str, watch_every_s: float | None = None):
        self.uri = uri
        self.watch_every_s = watch_every_s
        self._logs: list[dict[str, Any]] | None = None
        self._looked_at = 0.0
        self._opened: Bucket | None = None
        self._lock = threading.Lock()

    def _bucket(self) -> Bucket:
        if self._opened is None:
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(self.uri)
            self._opened = Bucket(self.uri, fs, root.rstrip("/"))
        return self._opened

    def _loaded(self) -> list[dict[str, Any]]:
        due = self.watch_every_s is not None and time.monotonic() - self._looked_at >= self.watch_every_s
        if self._logs is None or due:
            self._logs = self._read_from(self._logs or [])
            self._looked_at = time.monotonic()
        return self._logs

    def _read_from(self, logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`logs` (the entries read so far) followed by those of the objects written since."""
        bucket = self._bucket()
        logs = list(logs)
        for name in sorted(bucket.listing()):
            if not name.endswith(".jsonl") or int(name.partition(".")[0]) < len(logs):
                continue
            data = bucket.read(name) or b""
            # Objects are named by their first entry's number: a gap means a lost write.
            if int(name.partition(".")[0]) != len(logs):
                raise ValueError(f"the Optuna journal at {self.uri} lacks entries before {name}")
            logs += [json.loads(line) for line in data.decode().splitlines() if line]
        return logs

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        with self._lock:
            return list(self._loaded()[log_number_from:])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self.watch_every_s is not None:
            # A second writer would number its objects as the driver does, and one would replace the other's.
            raise PermissionError(f"the Optuna journal at {self.uri} is open for reading: only its sweep writes it")
        with self._lock:
            known = self._loaded()
            body = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in logs)
            self._bucket().write(f"{len(known):012d}.jsonl", body.encode())
            known.extend(logs)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self.watch_every_s is not None:
            return watch_journal, (self.uri, self.watch_every_s)
        return journal_at, (self.uri,)  # unpickled as this process's one journal there

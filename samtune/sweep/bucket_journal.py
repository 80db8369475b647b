"""An Optuna journal kept in object storage: the cells' studies of a sweep whose storage is a bucket.

A journal file in the driver's staging folder would reach the bucket only with the mirror's next
push, and a driver killed outright would leave the bucket a journal older than Tune's saved
searcher, which then names trials the journal lacks. Here each batch of journal entries is its
own object, ``<first entry's number>.jsonl``, written before the call returns: the bucket's
journal is never behind the searcher state Tune saves after it.

Only the sweep's driver (held by its lease) writes a sweep's journal, so entries are read from
the bucket once, when the journal is first opened, and kept in memory after that. Every cell's
searcher opens the same journal: `journal_at` gives them one shared object per URI (unpickled
searchers too), so their entries are numbered in one sequence.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

from optuna.storages.journal import BaseJournalBackend

from samtune.sweep.object_store import Bucket

_OPEN: dict[str, BucketJournal] = {}
_OPENING = threading.Lock()


def journal_at(uri: str) -> BucketJournal:
    """This process's one journal at ``uri``."""
    with _OPENING:
        if uri not in _OPEN:
            _OPEN[uri] = BucketJournal(uri)
        return _OPEN[uri]


class BucketJournal(BaseJournalBackend):
    """Optuna journal entries as objects under ``uri`` (e.g. ``s3://bucket/sweeps/<sweep>/optuna-journal``);
    open it with `journal_at`."""

    def __init__(self, uri: str):
        self.uri = uri
        self._logs: list[dict[str, Any]] | None = None
        self._opened: Bucket | None = None
        self._lock = threading.Lock()

    def _bucket(self) -> Bucket:
        if self._opened is None:
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(self.uri)
            self._opened = Bucket(self.uri, fs, root.rstrip("/"))
        return self._opened

    def _loaded(self) -> list[dict[str, Any]]:
        if self._logs is None:
            bucket = self._bucket()
            logs: list[dict[str, Any]] = []
            for name in sorted(bucket.listing()):
                if not name.endswith(".jsonl"):
                    continue
                data = bucket.read(name) or b""
                # Objects are named by their first entry's number: a gap means a lost write.
                if int(name.partition(".")[0]) != len(logs):
                    raise ValueError(f"the Optuna journal at {self.uri} lacks entries before {name}")
                logs += [json.loads(line) for line in data.decode().splitlines() if line]
            self._logs = logs
        return self._logs

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        with self._lock:
            return list(self._loaded()[log_number_from:])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self._lock:
            known = self._loaded()
            body = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in logs)
            self._bucket().write(f"{len(known):012d}.jsonl", body.encode())
            known.extend(logs)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return journal_at, (self.uri,)  # unpickled as this process's one journal there

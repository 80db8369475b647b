"""The records a sweep has not yet written to MLflow, and the file that keeps them.

A record is one write to one run (`Record`). While the tracking server fails, the pending records
are kept in a JSON-lines spool file (one record a line: ``run`` key, its ``name``, ``tags`` and
``parent`` chain, ``kind`` = params | metrics | tags | status | artifacts, ``step``, ``data``), so
a later driver on the same spool (``--resume``) writes them first and nothing is lost between
driver processes. A record the server refuses for good is set aside in ``<spool>.rejected.jsonl``
(same format, with its ``error``) instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from samtune.contract.messages import masked
from samtune.sweep.run_keys import RunKeys

# The tracker's warnings, under its name: one logger says what became of the records.
log = logging.getLogger("samtune.sweep.tracking")


@dataclass
class Record:
    """One write to run `key`, waiting for the store."""

    kind: str  # "params" | "metrics" | "tags" | "status" | "end" | "artifacts" | "dataset"
    key: str
    payload: Any
    step: int | None = None
    described: dict = field(default_factory=dict)


def failure_text(exc: BaseException) -> str:
    """An exception as a message shows it: its type and the first line of what it says, with the
    credentials of any address in it masked (MLflow names the URL a request failed on, and a
    tracking URI may carry a password)."""
    lines = masked(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


class Spool:
    """The spool file at `path` and its ``.rejected.jsonl`` companion; `runs` names the runs."""

    def __init__(self, path: str | os.PathLike, runs: RunKeys):
        self.path = str(path)
        self.rejected_path = self.path.removesuffix(".jsonl") + ".rejected.jsonl"
        self.runs = runs
        self.rejected = 0

    def line(self, record: Record) -> dict[str, Any]:
        spec = self.runs.specs.get(record.key)
        return {
            "run": record.key,
            "name": spec.name if spec else record.key,
            "tags": spec.tags if spec else {},
            "parent": spec.parent if spec else None,
            "ancestors": self.runs.ancestors(record.key),
            "kind": record.kind,
            "step": record.step,
            "data": record.payload,
        }

    def write(self, records: list[Record]) -> None:
        """Replace the spool with `records` (at once: a crash leaves the old one or the new)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".tmp", "w") as fh:
            for record in records:
                fh.write(json.dumps(self.line(record), default=str) + "\n")
        os.replace(self.path + ".tmp", self.path)

    def load(self) -> list[Record]:
        """The records an earlier driver could not write (a spool it left behind); their runs are
        declared in `runs`."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as fh:
            lines = [line for line in fh if line.strip()]
        records = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the rest still counts
            for run in [*reversed(rec.get("ancestors") or []), rec]:
                self.runs.add(run)
            records.append(Record(rec["kind"], rec["run"], rec["data"], step=rec.get("step")))
        return records

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

    def set_aside(self, record: Record, exc: Exception) -> None:
        """Keep a record the server refuses for good in the rejected file, with a warning."""
        self.rejected += 1
        os.makedirs(os.path.dirname(os.path.abspath(self.rejected_path)), exist_ok=True)
        with open(self.rejected_path, "a") as fh:
            fh.write(json.dumps({**self.line(record), "error": failure_text(exc)}, default=str) + "\n")
        log.warning(
            "MLflow refused a %s record of run %s (%s); it is saved in %s and not retried",
            record.kind,
            record.key,
            failure_text(exc),
            self.rejected_path,
        )

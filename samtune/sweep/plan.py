"""What a sweep is to run, decided before its first trial: the `Plan` and where its files live."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samtune.contract.messages import masked
from samtune.sweep.study import Sweep


@dataclass
class Plan:
    """Everything decided before the first trial: the sweep, where it lives, what it may use."""

    sweep: Sweep
    space: Any
    space_path: str
    sweep_dir: Path
    tracking_uri: str
    address: str | None
    resume: bool
    # Made when the sweep starts, kept in sweep.json: part of every MLflow run key, so a new sweep
    # of the same name starts new runs while --resume continues its own.
    sweep_id: str = ""
    # The flags that made this sweep what it is (--set, --trials, --data-root, --storage-path,
    # --address): --resume must be given them again, so the command it prints repeats them.
    flags: tuple[str, ...] = ()
    # Where each cell's Optuna study lives (`samtune.sweep.optuna_storage`): an RDB URL or a
    # journal file's path, kept in sweep.json for --resume; empty: in the searcher's pickle alone,
    # as sweeps from before storages kept them.
    optuna_storage: str = ""
    # This driver's hold on the sweep (`driver_lock`), for as long as the plan lives.
    lock: Any = field(default=None, repr=False, compare=False)
    # Its size and duration estimate (`samtune.sweep.estimate.Estimate`), said before it starts.
    estimate: Any = field(default=None, repr=False, compare=False)
    # With --storage-path in object storage: the sweep's folder there (`object_store.Bucket`),
    # and the `Mirror` that keeps ``sweep_dir`` (then a staging folder on this machine) in step
    # with it. None for a local or mounted folder.
    bucket: Any = field(default=None, repr=False, compare=False)
    mirror: Any = field(default=None, repr=False, compare=False)

    @property
    def sweep_key(self) -> str:
        return f"{self.sweep.name}@{self.sweep_id}" if self.sweep_id else self.sweep.name

    @property
    def report_dir(self) -> Path:
        """Where this sweep's report goes: in its own storage folder, named by its id, so that
        sweeps of one name (in other storage folders or stores, or run again) keep their own."""
        return self.sweep_dir / (f"report-{self.sweep_id}" if self.sweep_id else "report")

    def tune_path(self, folder: str) -> str:
        """Where Tune keeps experiment ``folder`` of this sweep: in the bucket, else the folder."""
        return self.bucket.uri_of(folder) if self.bucket is not None else str(self.sweep_dir / folder)

    @property
    def tune_storage(self) -> str:
        """Tune's ``storage_path`` for this sweep's experiments."""
        return self.bucket.uri if self.bucket is not None else str(self.sweep_dir)

    def tune_copy(self, folder: str) -> Path:
        """A local folder holding Tune's saved state of experiment ``folder``: the folder itself,
        or, for a sweep in object storage, a copy fetched now (all but the checkpoints, which
        Tune reads from the bucket)."""
        local = self.sweep_dir / folder
        if self.bucket is not None:
            self.bucket.download(folder, local, skip="checkpoint_")
        return local

    def tune_state_changed(self, folder: str, path: Path) -> None:
        """Send back a file of `tune_copy`'s copy that the driver changed (nothing to do locally)."""
        if self.bucket is not None:
            self.bucket.write(f"{folder}/{path.relative_to(self.sweep_dir / folder).as_posix()}", path.read_bytes())

    @property
    def resume_command(self) -> str:
        """The command that finishes this sweep, ready to paste; an address in it (a storage URI)
        shows no secret, which the user gives again."""
        return masked(
            " ".join(
                [
                    "samtune",
                    "sweep",
                    shlex.quote(shown_path(self.space_path)),
                    *(shlex.quote(f) for f in self.flags),
                    "--resume",
                ]
            )
        )


def shown_path(path: str) -> str:
    """`path` relative to here when it lies below here, else absolute: short, and pasteable."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith(os.pardir) else relative


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# The one Tune experiment folder of a sweep, under its folder: every cell's trials, checkpoints
# and searcher state.
TUNE_DIR = "trials"

#: The sweep's folders Tune writes itself (the search's, and each confirmation round's): in object
#: storage, Tune sends them to the bucket, so the driver's mirror leaves them alone.
TUNE_FOLDERS = (TUNE_DIR, "confirm")

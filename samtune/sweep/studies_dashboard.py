"""A sweep's Optuna studies in optuna-dashboard (``samtune studies``), wherever the sweep keeps them.

`find_studies` finds the Optuna storage of a sweep as ``--resume`` does (what its ``sweep.json``
saved, read from its folder or from the bucket; before that file exists, the storage a new sweep
takes by default), opens it for reading (a journal in a bucket, which ``optuna-dashboard URL``
cannot open, through `bucket_journal.watch_journal`: new trials show while the sweep runs, and
nothing is written there) and lists the sweep's studies; `serve_studies` serves optuna-dashboard
over it on 127.0.0.1. Every problem is a one-line `SweepError`, before anything serves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from samtune.contract.messages import first_line, masked
from samtune.sweep.cluster import storage_folder
from samtune.sweep.errors import SweepError
from samtune.sweep.object_store import Bucket, is_remote, read_bucket, shown, staging_folder
from samtune.sweep.optuna_storage import (
    default_storage,
    holds_anything,
    in_bucket,
    open_storage,
    resolve_storage,
    saved_storage,
)
from samtune.sweep.storage import check_storage_uri, checked_storage_path

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

#: The one address the dashboard listens on: it has no login, and its pages can change studies.
HOST = "127.0.0.1"


@dataclass
class Studies:
    """A sweep's studies, found: the storage they live in (as ``--optuna-storage`` names it),
    opened for reading, and each study's name with its id there (its page's address)."""

    sweep_name: str
    where: str
    storage: BaseStorage
    ids: dict[str, int]


def find_studies(sweep_name: str, storage_path: str | None = None, optuna_storage: str | None = None) -> Studies:
    """The studies of sweep `sweep_name`: in `optuna_storage` when given, else in the storage the
    sweep under `storage_path` (default as for ``samtune sweep``) started with. SweepError (one
    line, secrets masked) for a URI that carries credentials, a bucket that cannot be read, a
    sweep that is not there, a storage that cannot be opened or that holds none of its studies."""
    if optuna_storage:
        value, missing = resolve_storage(optuna_storage, Path(".")), ""
        flag = f"--optuna-storage {masked(value)}"
    else:
        value, missing = _sweeps_storage(sweep_name, storage_path)
        flag = f"the Optuna storage of sweep {sweep_name!r}, {masked(value)},"
    if in_bucket(value):
        check_storage_uri(value, "--optuna-storage")
        read_bucket(value, "--optuna-storage")
    names: list[str] = []
    ids: dict[str, int] = {}
    try:
        storage = open_storage(value, reading=True) if holds_anything(value) else None
        if storage is not None:
            names = sorted(s.study_name for s in storage.get_all_studies())
            ids = {n: storage.get_study_id_from_name(n) for n in names if n.startswith(f"{sweep_name}/")}
    except Exception as exc:  # noqa: BLE001  any driver's error: the storage is unusable
        raise SweepError(f"{flag} cannot be opened by Optuna ({masked(first_line(exc))})") from None
    if storage is None or not ids:
        if missing:
            raise SweepError(missing)
        others = sorted({n.split("/", 1)[0] for n in names})
        held = f" (it holds those of {', '.join(map(repr, others[:3]))})" if others else ""
        raise SweepError(f"{flag} holds no study of sweep {sweep_name!r}{held}")
    return Studies(sweep_name, value, storage, ids)


def _sweeps_storage(sweep_name: str, storage_path: str | None) -> tuple[str, str]:
    """The Optuna storage of sweep `sweep_name` under `storage_path`, and what to say if it holds
    none of its studies."""
    top = checked_storage_path(storage_path)
    bucket: Bucket | None = None
    if is_remote(top):
        reached = read_bucket(top)
        bucket = Bucket(reached.uri_of(sweep_name), reached.fs, reached.path(sweep_name))
        # A driver's staging folder: where the sweep would see a journal file in its folder.
        sweep_dir = staging_folder(top) / sweep_name
        state = bucket.read("sweep.json")
    else:
        sweep_dir = storage_folder(top) / sweep_name
        state = (sweep_dir / "sweep.json").read_bytes() if (sweep_dir / "sweep.json").is_file() else None
    if state is None:  # a sweep starting (or its driver's first push not made yet), or none at all
        value = resolve_storage(default_storage(bucket), sweep_dir)
        return value, (
            f"no sweep {sweep_name!r} in {shown(top)}: no sweep.json there, and no study of it in "
            f"{masked(value)}; give the --storage-path it ran with (and its --optuna-storage, if it had one)"
        )
    try:
        saved = json.loads(state).get("optuna_storage")
    except ValueError:
        raise SweepError(f"sweep {sweep_name!r} in {shown(top)}: its sweep.json is not JSON") from None
    if not saved:
        raise SweepError(
            f"sweep {sweep_name!r} in {shown(top)} started before Optuna storages: its studies are only in "
            "its saved searcher (samtune.sweep.load_study opens them in Python)"
        )
    value = saved_storage(saved, sweep_dir, sweep_name)
    return (
        value,
        f"sweep {sweep_name!r} has no study yet in its Optuna storage {masked(value)}: its first trials make them",
    )


def serve_studies(studies: Studies, port: int) -> None:
    """Serve optuna-dashboard over `studies`' storage on 127.0.0.1:`port` until interrupted."""
    import optuna_dashboard

    optuna_dashboard.run_server(studies.storage, host=HOST, port=port)

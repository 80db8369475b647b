"""Where each cell's Optuna study lives: an Optuna storage that ``optuna-dashboard`` opens.

``--optuna-storage`` takes an RDB URL (``sqlite:///path``, ``postgresql://...``), the path of a
journal file (an Optuna `JournalStorage`) or a journal's folder in object storage
(`bucket_journal`); without it, a journal in the sweep's folder (in the bucket, for a sweep there).
`resolve_storage` turns the flag (or `default_storage`) into what a `Plan` keeps, `saved_storage`
reads it back from what ``sweep.json`` saved, `check_optuna_storage` refuses a storage that cannot
serve the sweep before anything runs, `open_storage` opens it (for a writer, or for a reader
beside a running sweep), `study_name` names a cell's study in it and `sweep_studies` lists a
sweep's studies there. Every message masks an RDB URL's password.

>>> resolve_storage("sqlite:///studies.db", Path("/runs/demo")) == "sqlite:///" + os.path.abspath("studies.db")
True
>>> resolve_storage(None, Path("/runs/demo"))
'/runs/demo/optuna-journal.log'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from samtune.contract.messages import first_line, masked
from samtune.sweep.bucket_journal import journal_at, watch_journal
from samtune.sweep.errors import SweepError
from samtune.sweep.object_store import Bucket
from samtune.sweep.storage import check_storage_uri
from samtune.sweep.study import Cell

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

#: The default storage: a journal file in the sweep's folder.
JOURNAL = "optuna-journal.log"
#: The default for a sweep in object storage: a journal folder in the sweep's folder there.
JOURNAL_FOLDER = "optuna-journal"


def is_url(value: str) -> bool:
    """Whether `value` is an RDB URL (else the path of a journal file, or a journal in a bucket)."""
    return "://" in value and not in_bucket(value)


def in_bucket(value: str) -> bool:
    """Whether `value` names a journal in object storage (`bucket_journal`).

    >>> in_bucket("s3://b/sweeps/t/optuna-journal"), in_bucket("sqlite:///x.db"), in_bucket("x.log")
    (True, False, False)
    """
    return value.split("://", 1)[0].lower() in OBJECT_SCHEMES if "://" in value else False


#: URI schemes of object storage (pyarrow's filesystems), as opposed to databases' URLs.
OBJECT_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs")


def resolve_storage(value: str | None, sweep_dir: Path) -> str:
    """What a plan keeps of ``--optuna-storage``: an RDB URL (a relative SQLite path made
    absolute, so that ``--resume`` from another folder finds it) or a journal file's absolute
    path; none given, the journal in the sweep's folder."""
    if not value:
        return str(sweep_dir / JOURNAL)
    if in_bucket(value):
        return value
    if not is_url(value):
        return os.path.abspath(os.path.expanduser(value))
    head, sep, path = value.partition(":///")
    if sep and head.split("+")[0] == "sqlite" and path and not path.startswith("/") and path != ":memory:":
        return f"{head}:///{os.path.abspath(path)}"
    return value


def default_storage(bucket: Bucket | None) -> str | None:
    """What a new sweep without ``--optuna-storage`` gives `resolve_storage`: for a sweep in object
    storage (`bucket`, its folder there) the journal folder beside its files there; else None,
    the journal file in its folder."""
    return bucket.uri_of(JOURNAL_FOLDER) if bucket is not None else None


def saved_storage(saved: str, sweep_dir: Path, sweep_name: str) -> str:
    """The storage a sweep's ``sweep.json`` names (`saved`), as seen from its folder now: the
    default journal file travels with the sweep's folder (resumed from a bucket on another machine,
    another staging folder, or from a folder mounted elsewhere).

    >>> saved_storage("/old/mount/t/optuna-journal.log", Path("/runs/t"), "t")
    '/runs/t/optuna-journal.log'
    >>> saved_storage("sqlite:///studies.db", Path("/runs/t"), "t")
    'sqlite:///studies.db'
    """
    if "://" not in saved and Path(saved).name == JOURNAL and Path(saved).parent.name == sweep_name:
        return str(sweep_dir / JOURNAL)
    return saved


def study_name(sweep_name: str, cell: Cell) -> str:
    """A cell's study in the storage: ``<sweep name>/<cell slug>``."""
    return f"{sweep_name}/{cell.slug}"


def open_storage(value: str, reading: bool = False) -> BaseStorage:
    """The Optuna storage `value` names: an `RDBStorage` for a URL, else a `JournalStorage` on
    that file (its folder made if missing) or bucket journal (`journal_at`, the sweep's writer).

    `reading`: for a reader beside a sweep that may be running, which makes nothing: no tables
    in a database, no folder, and a bucket journal that refuses to write and sees new entries
    (`watch_journal`)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if is_url(value):
        return optuna.storages.RDBStorage(value, skip_table_creation=reading)
    if in_bucket(value):
        return JournalStorage(watch_journal(value) if reading else journal_at(value))
    if not reading:
        Path(value).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(value))


def holds_anything(value: str) -> bool:
    """Whether the storage may hold studies: not a journal or SQLite file that does not exist yet
    (opening it would make it).

    >>> holds_anything("/no/such/optuna-journal.log"), holds_anything("sqlite:////no/such.db")
    (False, False)
    >>> holds_anything("s3://b/t/optuna-journal"), holds_anything("postgresql://db/studies")
    (True, True)
    """
    if in_bucket(value):
        return True
    if not is_url(value):
        return Path(value).exists()
    head, sep, path = value.partition(":///")
    return not (sep and head.split("+")[0] == "sqlite" and path != ":memory:" and not Path(path).exists())


def sweep_studies(storage: BaseStorage, sweep_name: str) -> list[str]:
    """The names of the sweep's studies in `storage` (``<sweep name>/...``), sorted."""
    prefix = f"{sweep_name}/"
    return sorted(s.study_name for s in storage.get_all_studies() if s.study_name.startswith(prefix))


def check_optuna_storage(value: str, sweep_name: str, resume: bool) -> list[str]:
    """Refuse (`SweepError`, one line) a storage that cannot hold the sweep's studies: an unknown
    URL scheme, a database driver that is not installed, a journal file whose folder cannot be
    written, a storage that cannot be opened, or, for a new sweep, one that already holds a study
    of this sweep's name. Returns the names of the sweep's studies it holds."""
    flag = f"--optuna-storage {masked(value)}"
    if is_url(value):
        _check_driver(value, flag)
    elif not in_bucket(value):  # a bucket is probed as the sweep's storage, or by opening it below
        _check_journal(Path(value), flag)
    else:  # sweep.json saves the URI and messages print it: no credentials in it
        check_storage_uri(value, "--optuna-storage")
    try:
        held = _studies_of(value, sweep_name)
    except Exception as exc:  # noqa: BLE001  any driver's error: the storage is unusable
        raise SweepError(f"{flag}: Optuna cannot open it ({masked(first_line(exc))})") from None
    if held and not resume:
        raise SweepError(
            f"{flag} already holds study {held[0]!r} of a sweep named {sweep_name!r}; finish that sweep "
            "with --resume, or start another with --set name=... or another --optuna-storage"
        )
    return held


def _check_driver(value: str, flag: str) -> None:
    try:
        dialect = make_url(value).get_dialect()
    except ArgumentError:
        scheme = value.split("://", 1)[0]
        raise SweepError(
            f"{flag}: unknown URL scheme {scheme!r}; give a database URL (sqlite:///path, "
            "postgresql://user:password@host/db, mysql://...) or the path of a journal file"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise SweepError(f"{flag}: its database driver is not installed ({exc}); pip install it") from None


def _check_journal(path: Path, flag: str) -> None:
    if path.is_dir():
        raise SweepError(f"{flag}: a folder; give the path of a journal file (e.g. {path / JOURNAL})")
    folder = path.parent
    while not folder.exists():  # made when the sweep starts: its nearest existing folder must take it
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise SweepError(f"{flag}: cannot write a journal file in {folder}")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise SweepError(f"{flag}: cannot read and write {path}")


def _studies_of(value: str, sweep_name: str) -> list[str]:
    """The names of the sweep's studies in the storage; a journal or SQLite file that does not
    exist yet holds none and is not made here."""
    return sweep_studies(open_storage(value), sweep_name) if holds_anything(value) else []

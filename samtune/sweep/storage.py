"""Where a sweep keeps its files, and this driver's hold on it.

A local or mounted folder (`cluster.storage_folder`) is checked for room and locked with
`driver_lock`. Object storage (``s3://...``: `object_store`) is checked by a probe write, held
with a `lease`, and worked on through a staging folder on this machine that a `Mirror` keeps in
step with the bucket.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from samtune.sweep.cluster import check_storage, storage_folder
from samtune.sweep.driver_lock import DriverLock, SweepBusy
from samtune.sweep.errors import SweepError
from samtune.sweep.lease import DriverLease
from samtune.sweep.object_store import Bucket, Mirror, is_remote, open_bucket, shown, staging_folder
from samtune.sweep.plan import TUNE_FOLDERS

log = logging.getLogger(__name__)

#: Query parameters of a storage URI that would carry a secret (pyarrow's S3 URIs accept them).
SECRET_PARAMS = ("access_key", "secret_key", "session_token")

#: Written into the staging folder when the last push to the bucket failed: this machine then
#: holds the sweep's newest files, which the next driver here sends before anything else.
UNSENT = ".samtune-unsent"


@dataclass
class Held:
    """A sweep's storage, held: its folder on this machine, and for object storage its folder in
    the bucket and the mirror between the two."""

    storage: Path
    sweep_dir: Path
    lock: Any
    bucket: Bucket | None = None
    mirror: Mirror | None = None


def checked_storage_path(storage_path: str | None) -> str:
    """The storage path asked for (else ``$SAMTUNE_STORAGE``, else ``ray_results``), refused now
    if it can lead nowhere: a URI that carries credentials, a folder whose links loop."""
    storage_value = storage_path or os.environ.get("SAMTUNE_STORAGE") or "ray_results"
    if is_remote(storage_value):
        check_storage_uri(storage_value)
    else:
        storage_folder(storage_value)
    return storage_value


def check_storage_uri(uri: str, flag: str = "--storage-path") -> None:
    """Refuse a storage URI that carries credentials: URIs are printed (the resume command) and
    saved, credentials never are. `flag` is the option the URI came from."""
    parts = urlsplit(uri)
    secret = sorted(k for k in parse_qs(parts.query) if k.lower() in SECRET_PARAMS)
    if parts.password is not None or secret:
        what = ", ".join(secret) or "a password"
        raise SweepError(
            f"{flag} {shown(uri)}: the URI carries credentials ({what}); samtune prints and saves storage "
            "URIs, so give credentials the way the storage's own tools read them (for S3: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a profile, or the node's role)"
        )


def hold(storage_path: str, name: str) -> Held:
    """Check ``storage_path`` and take this driver's hold on sweep ``name`` there; SweepError for
    storage that cannot hold the sweep or a sweep another driver holds.

    For object storage the staging folder then holds the bucket's copy of the sweep (so a
    ``--resume`` on another machine starts from what the last driver sent)."""
    if not is_remote(storage_path):
        storage = storage_folder(storage_path)
        return Held(storage, storage / name, _lock(storage, name))
    check_storage_uri(storage_path)
    top = open_bucket(storage_path)
    storage = staging_folder(storage_path)
    sweep_dir = storage / name
    lease = DriverLease.acquire(top, name)
    bucket = Bucket(top.uri_of(name), top.fs, top.path(name))
    mirror = Mirror(sweep_dir, bucket, skip=TUNE_FOLDERS)
    unsent = sweep_dir / UNSENT
    if unsent.exists():
        # This machine's last driver could not send its last files: they are the newest.
        sent = mirror.push()
        unsent.unlink()
        log.warning("sent %d files of sweep %r that its last driver on this machine could not", sent, name)
    mirror.pull()
    return Held(storage, sweep_dir, lease, bucket, mirror)


def _lock(storage: Path, name: str) -> DriverLock:
    """This driver's lock on sweep `name`, in a storage folder it can write."""
    check_storage(storage)
    try:
        # Before the sweep's state is read: a second driver must not even look at a sweep that
        # another one is changing.
        return DriverLock.acquire(storage, name)
    except SweepBusy as exc:
        raise SweepError(str(exc)) from None
    except OSError as exc:
        raise SweepError(
            f"--storage-path {storage}: cannot hold sweep {name!r} there ({exc.strerror or exc})"
        ) from None


def send_last(held_mirror: Mirror | None, sweep_dir: Path) -> str | None:
    """Push the sweep's last files to the bucket; a message when some could not be sent (they
    stay in the staging folder, marked, and the next driver on this machine sends them)."""
    if held_mirror is None:
        return None
    try:
        held_mirror.stop()
    except Exception as exc:  # noqa: BLE001  the bucket away at the very end
        (sweep_dir / UNSENT).touch()
        return (
            f"samtune: the sweep's last files could not be sent to {shown(held_mirror.bucket.uri)} "
            f"({type(exc).__name__}); they are kept in {sweep_dir}, and the next samtune sweep --resume "
            "on this machine sends them"
        )
    return None

"""A sweep kept in object storage: ``--storage-path s3://bucket/prefix`` (or ``gs://``, or any URI
pyarrow's filesystems open).

Ray Tune writes its part (every trial's checkpoints, its experiment and searcher state) to the
bucket itself, from whichever node a trial runs on. The rest of a sweep's files (``sweep.json``,
the MLflow spool, the confirmation stage's bookkeeping, verdicts, the picks' models, the report)
are written by the driver into a staging folder on its own machine, which `Mirror` keeps in step
with the bucket: pulled from it when a driver starts (so ``--resume`` works from any machine),
pushed to it while the sweep runs and when it ends.

Credentials come from the environment the way each filesystem reads them (for S3: the
``AWS_*`` variables, a profile, or the node's role); samtune never prints or saves them, and
URIs are shown with `masked`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samtune.contract.messages import first_line, masked
from samtune.sweep.errors import SweepError

#: Schemes that name a local folder rather than object storage.
LOCAL_SCHEMES = ("", "file")


def is_remote(storage_path: str) -> bool:
    """Whether ``storage_path`` names object storage (a URI with a scheme other than ``file``).

    >>> is_remote("s3://bucket/sweeps"), is_remote("gs://b"), is_remote("ray_results"), is_remote("file:///x")
    (True, True, False, False)
    """
    scheme, sep, _ = storage_path.partition("://")
    return bool(sep) and scheme.lower() not in LOCAL_SCHEMES and "/" not in scheme


def shown(uri: str) -> str:
    """The URI as messages show it: credentials masked, query parameters (which may carry keys)
    left out.

    >>> shown("s3://bucket/sweeps?endpoint_override=h:9000&secret_key=abc")
    's3://bucket/sweeps?...'
    """
    base, query, _ = uri.partition("?")
    return masked(base) + ("?..." if query else "")


@dataclass
class Bucket:
    """A folder in object storage: its URI, the pyarrow filesystem that reaches it, and the path
    within that filesystem."""

    uri: str
    fs: Any = field(repr=False)
    root: str

    def path(self, relative: str = "") -> str:
        return f"{self.root}/{relative}".rstrip("/") if relative else self.root

    def uri_of(self, relative: str) -> str:
        """The URI of ``relative`` under this folder (query parameters kept, for Tune)."""
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{relative}{sep}{query}"

    def read(self, relative: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path(relative)).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(relative)) as fh:
            return bytes(fh.read())

    def write(self, relative: str, data: bytes) -> None:
        # One PUT: an object is replaced whole or not at all, so no reader sees half a file.
        with self.fs.open_output_stream(self.path(relative)) as fh:
            fh.write(data)

    def delete(self, relative: str) -> None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(relative))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(relative))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(relative))

    def download(self, relative: str, local: Path, skip: str) -> int:
        """Copy the objects under ``relative`` whose path does not contain ``skip`` into the
        folder ``local`` (replacing what it held); returns how many."""
        shutil.rmtree(local, ignore_errors=True)
        count = 0
        for name in self.listing(relative):
            if skip in name:
                continue
            data = self.read(f"{relative}/{name}")
            if data is None:
                continue
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            count += 1
        return count

    def listing(self, relative: str = "") -> dict[str, tuple[int, int]]:
        """Every object under ``relative``: its path relative to it -> (size, mtime in ns)."""
        import pyarrow.fs as pafs

        top = self.path(relative)
        infos = self.fs.get_file_info(pafs.FileSelector(top, recursive=True, allow_not_found=True))
        return {i.path[len(top) + 1 :]: (i.size or 0, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File}


def open_bucket(uri: str) -> Bucket:
    """The object-storage folder ``uri`` names, checked by writing and deleting a probe object
    there; SweepError naming the problem (no such bucket, no credentials, no access, no
    connection) before anything else is done."""
    bucket = _bucket_at(uri, "--storage-path")
    probe = f".samtune-write-test-{os.getpid()}"
    try:
        bucket.write(probe, b"x")
        bucket.delete(probe)
    except Exception as exc:  # noqa: BLE001  any failure here means the sweep could not keep its files
        raise SweepError(
            f"--storage-path {shown(uri)}: cannot write there: {_why(first_line(exc), bucket.root)}"
        ) from None
    return bucket


def read_bucket(uri: str, flag: str = "--storage-path") -> Bucket:
    """The object-storage folder ``uri`` names, checked by listing it, for a reader that writes
    nothing there; SweepError naming the problem as `open_bucket` does, the option it came from
    (`flag`) first. An empty or missing folder in a bucket that answers is no error here."""
    import pyarrow.fs as pafs

    bucket = _bucket_at(uri, flag)
    try:
        bucket.fs.get_file_info(pafs.FileSelector(bucket.root, allow_not_found=False))
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001  any failure here means nothing could be read there
        raise SweepError(f"{flag} {shown(uri)}: cannot read there: {_why(first_line(exc), bucket.root)}") from None
    return bucket


def _bucket_at(uri: str, flag: str) -> Bucket:
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001  pyarrow raises ArrowInvalid, OSError or ValueError
        raise SweepError(f"{flag} {shown(uri)}: not a storage URI pyarrow can open ({first_line(exc)})") from None
    return Bucket(uri, fs, root.rstrip("/"))


#: What pyarrow's S3 errors say, in the user's words.
_REASONS = {
    "NO_SUCH_BUCKET": "there is no bucket {bucket!r}",
    "ACCESS_DENIED": "access denied for this machine's credentials",
    "INVALID_ACCESS_KEY_ID": "the access key is not one the storage knows",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key",
    "NETWORK_CONNECTION": "cannot connect to the storage (its endpoint, AWS_ENDPOINT_URL if set)",
    "No credentials": "no credentials found (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role)",
}


def _why(error: str, root: str) -> str:
    """The reason a probe write failed, in a few words (the storage's own words when unknown).

    >>> _why("... AWS Error NO_SUCH_BUCKET during CreateMultipartUpload ...", "nope/sweeps")
    "there is no bucket 'nope'"
    """
    for code, reason in _REASONS.items():
        if code in error:
            return reason.format(bucket=root.split("/", 1)[0])
    return masked(error)


def staging_folder(uri: str) -> Path:
    """This machine's working copy of the sweeps under ``uri`` (``$SAMTUNE_STAGING``, else the
    user's cache folder): a cache, rebuilt from the bucket whenever a driver starts."""
    root = os.environ.get("SAMTUNE_STAGING") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "samtune", "staging"
    )
    return Path(root) / hashlib.sha256(uri.encode()).hexdigest()[:16]


class Mirror:
    """Keeps a sweep's staging folder and its folder in the bucket in step, leaving alone the
    folders Tune writes to the bucket itself (``skip``).

    `pull` makes the staging folder the bucket's copy; `push` uploads what changed since the
    last push (a file is one PUT, so the bucket never holds half of one); `start` pushes every
    ``period_s`` seconds in a thread until `stop`, which pushes one last time.
    """

    def __init__(self, local: Path, bucket: Bucket, skip: tuple[str, ...], period_s: float = 15.0):
        self.local = local
        self.bucket = bucket
        self.skip = skip
        self.period_s = period_s
        self._sent: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.bytes_pushed = 0

    def _skipped(self, relative: str) -> bool:
        top = relative.split("/", 1)[0]
        # Temporary files mid-write, and the staging folder's own markers, stay on this machine.
        return top.startswith(self.skip) or top.startswith(".") and top.endswith(".tmp") or top.startswith(".samtune-")

    def pull(self) -> int:
        """Replace the staging folder by the bucket's copy (Tune's folders left out); returns how
        many files came down."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True, mode=0o700)
        count = 0
        for relative in self.bucket.listing():
            if self._skipped(relative):
                continue
            data = self.bucket.read(relative)
            if data is None:
                continue
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            st = target.stat()
            self._sent[relative] = (st.st_size, st.st_mtime_ns)
            count += 1
        return count

    def push(self) -> int:
        """Upload every file of the staging folder that changed since it was last sent, and
        delete from the bucket what the driver deleted; returns how many files went up."""
        with self._lock:
            seen: dict[str, tuple[int, int]] = {}
            count = 0
            for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
                relative = path.relative_to(self.local).as_posix()
                if self._skipped(relative):
                    continue
                try:
                    st = path.stat()
                    stamp = (st.st_size, st.st_mtime_ns)
                    seen[relative] = stamp
                    if self._sent.get(relative) == stamp:
                        continue
                    data = path.read_bytes()
                except OSError:  # removed or replaced while we looked: the next push sends it
                    continue
                self.bucket.write(relative, data)
                self._sent[relative] = stamp
                self.bytes_pushed += len(data)
                count += 1
            for gone in set(self._sent) - set(seen):
                self.bucket.delete(gone)
                del self._sent[gone]
            return count

    def start(self) -> Mirror:
        def loop() -> None:
            while not self._stop.wait(self.period_s):
                try:
                    self.push()
                except Exception:  # noqa: BLE001  a bucket away for a while: the next push catches up
                    pass

        self._thread = threading.Thread(target=loop, name="samtune-mirror", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the pushing thread and push what is left (errors propagate: the caller says what
        the bucket is missing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.push()


class UploadRaceFilter(logging.Filter):
    """Drops Tune's traceback for an upload that found a temporary file gone.

    Tune uploads its driver folder to object storage while its searcher replaces its state file
    through a temporary one; an upload that lists the temporary file and then finds it renamed
    logs a traceback, though nothing is lost: the next upload, seconds later, carries the state.
    Any other failure to upload is still logged.
    """

    LOGGER = "ray.tune.execution.experiment_state"

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, FileNotFoundError) and "-tmp-" in str(exc))

    def install(self) -> UploadRaceFilter:
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def remove(self) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)

"""One driver per sweep on object storage: a lease object, held while its driver lives.

A file lock (`driver_lock`) needs a file system that locks; a bucket has none. What S3 does have
is the conditional write: a PUT with ``If-None-Match: *`` creates an object only if there is
none, and one with ``If-Match: <etag>`` replaces it only if nobody else has since. So the lease
``.<sweep>.driver.lease`` beside the sweep's folder is created by the driver that takes the sweep,
renewed by it every quarter lease (each renewal conditional on its own last write), and deleted
when it ends. A driver killed outright stops renewing: once the lease is older than
``SAMTUNE_LEASE_S`` seconds (60 by default), by the bucket's own clock, a new driver takes it
over (again conditionally, so of two newcomers only one wins). A driver that finds its lease
taken from it stops its sweep at once.
"""

from __future__ import annotations

import atexit
import email.utils
import json
import logging
import os
import signal
import threading
from typing import Any
from urllib.parse import parse_qs

from samtune.contract.messages import first_line
from samtune.sweep.driver_lock import describe_holder, holder_record
from samtune.sweep.errors import SweepError
from samtune.sweep.object_store import Bucket, shown

log = logging.getLogger(__name__)

#: Seconds without a renewal after which a lease is taken to be its driver's last.
LEASE_S = 60.0


def lease_seconds() -> float:
    """``SAMTUNE_LEASE_S`` (seconds, at least 2), else `LEASE_S`; SweepError for a bad value."""
    raw = os.environ.get("SAMTUNE_LEASE_S", "")
    if not raw:
        return LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 2:
        raise SweepError(f"SAMTUNE_LEASE_S={raw!r}: give the lease's length in seconds, at least 2")
    return value


def s3_client(bucket: Bucket) -> Any:
    """A boto3 client for ``bucket``'s endpoint (the URI's ``endpoint_override``, else boto3's own
    settings: ``AWS_ENDPOINT_URL``, the profile, the region)."""
    try:
        import boto3
    except ImportError:
        raise SweepError(
            f"--storage-path {shown(bucket.uri)}: holding a sweep on S3 needs boto3 (pip install 'samtune[cloud]')"
        ) from None
    query = parse_qs(bucket.uri.partition("?")[2])
    endpoint = query.get("endpoint_override", [None])[0]
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', ['https'])[0]}://{endpoint}"
    return boto3.client("s3", endpoint_url=endpoint)


def stop_this_sweep() -> None:
    """Stop this driver's sweep the way Ctrl-C does: its state saved, resumable."""
    os.kill(os.getpid(), signal.SIGINT)


def _precondition_failed(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict")


class DriverLease:
    """Held from `acquire` until `release` (or, if the driver dies, until it lapses)."""

    def __init__(self, client: Any, bucket_name: str, key: str, etag: str, lease_s: float, record: dict[str, Any]):
        self.client, self.bucket_name, self.key = client, bucket_name, key
        self.etag, self.lease_s, self.record = etag, lease_s, record
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="samtune-lease", daemon=True)
        self._thread.start()
        atexit.register(self.release)  # a driver that ends, however it ends short of SIGKILL, lets go

    @classmethod
    def acquire(cls, bucket: Bucket, name: str) -> DriverLease:
        """Take sweep `name`'s lease in ``bucket``; SweepError naming the driver that holds it."""
        if not bucket.uri.lower().startswith("s3://"):
            raise SweepError(
                f"--storage-path {shown(bucket.uri)}: samtune keeps one driver per sweep with a conditional write, "
                "which it does on S3-compatible storage (s3://: AWS S3, MinIO, Ceph, R2); use an s3:// URI, or a "
                "folder every node mounts"
            )
        client, lease_s = s3_client(bucket), lease_seconds()
        bucket_name, _, prefix = bucket.root.partition("/")
        key = f"{prefix}/.{name}.driver.lease".lstrip("/")
        record = holder_record()
        body = json.dumps(record).encode()
        try:
            etag = client.put_object(Bucket=bucket_name, Key=key, Body=body, IfNoneMatch="*")["ETag"]
        except Exception as exc:  # noqa: BLE001  botocore's ClientError, or no connection at all
            if not _precondition_failed(exc):
                raise SweepError(
                    f"--storage-path {shown(bucket.uri)}: cannot take the sweep's lease ({first_line(exc)})"
                ) from None
            etag = _take_over(client, bucket_name, key, body, name, lease_s)
        return cls(client, bucket_name, key, etag, lease_s, record)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                resp = self.client.put_object(
                    Bucket=self.bucket_name, Key=self.key, Body=json.dumps(self.record).encode(), IfMatch=self.etag
                )
                self.etag = resp["ETag"]
            except Exception as exc:  # noqa: BLE001
                if _precondition_failed(exc):
                    self.lost = True
                    log.error(
                        "another driver took this sweep's lease (this one could not renew it for %.0f s); "
                        "stopping here so that only one driver runs the sweep",
                        self.lease_s,
                    )
                    stop_this_sweep()
                    return
                # The bucket away for a moment: renew at the next beat, before the lease lapses.

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still this driver's."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            self.client.delete_object(Bucket=self.bucket_name, Key=self.key, IfMatch=self.etag)
        except Exception:  # noqa: BLE001  it lapses on its own
            pass


def _take_over(client: Any, bucket_name: str, key: str, body: bytes, name: str, lease_s: float) -> str:
    """The lease of a driver that stopped renewing it, taken over; SweepError while it lives."""
    head = client.get_object(Bucket=bucket_name, Key=key)
    holder = describe_holder(head["Body"].read(), unknown="another driver")
    now = email.utils.parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
    silent = (now - head["LastModified"]).total_seconds()
    if silent <= lease_s:
        raise SweepError(
            f"sweep {name!r} is already running ({holder}, last heard from {silent:.0f} s ago); wait for it to "
            f"end, or stop it and finish it with --resume (a driver that died is taken over {lease_s:.0f} s after "
            f"it was last heard from)"
        )
    try:
        etag = client.put_object(Bucket=bucket_name, Key=key, Body=body, IfMatch=head["ETag"])["ETag"]
    except Exception as exc:  # noqa: BLE001
        if _precondition_failed(exc):
            raise SweepError(f"sweep {name!r} was just taken by another driver; wait for it to end") from None
        raise
    log.warning("took over sweep %r from %s, silent for %.0f s", name, holder, silent)
    return str(etag)

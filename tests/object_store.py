"""An S3 API server on 127.0.0.1 for the tests that keep a sweep in object storage, and what
every test that starts a server uses: a free port, reading JSON, waiting for optuna-dashboard
to serve, stopping a server by PID.

`s3_server` starts moto's server mode on a free port (stopped by PID at the end), creates a
bucket, and points this process's AWS settings at it through the environment (the standard
`AWS_ENDPOINT_URL` and keys, which boto3, pyarrow and MLflow all read), so that child processes
started by the test inherit them too. The keys are dummies moto accepts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Dummy credentials: moto accepts any; a test looks for them in output to check they never appear.
ACCESS_KEY = "AKIASAMTUNETESTKEY01"
SECRET_KEY = "samtune-test-secret-0123456789abcdefghij"


@dataclass
class S3Server:
    """A running S3 API server and the bucket made for the test."""

    endpoint: str
    bucket: str
    pid: int

    def client(self):  # noqa: ANN201 - boto3's client type is generated at run time
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` in the bucket, but the empty folder markers (keys
        ending in ``/``) that pyarrow writes to keep a folder whose last file it deleted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]

    def env(self) -> dict[str, str]:
        """The settings a process needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            # MLflow's artifact client reads its own name for the endpoint.
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> object:
    """The JSON an HTTP GET of ``url`` returns."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for_dashboard(address: str, proc: subprocess.Popen, why: Callable[[], str], timeout: float = 60.0) -> None:
    """Wait until the optuna-dashboard at ``address`` answers; AssertionError with ``why()`` (its
    output) when ``proc`` exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            get_json(f"{address}/api/meta")
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the dashboard did not serve: {why()}") from None
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """Stop a server the test started, by its PID: SIGTERM, then SIGKILL after 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the S3 server did not start listening")


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 with a bucket ``sweeps``; this process's environment points at it."""
    port = free_port()
    log = open(tmp_path / "s3-server.log", "w")
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc)
        server = S3Server(f"http://127.0.0.1:{port}", "sweeps", proc.pid)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop(proc)
        log.close()

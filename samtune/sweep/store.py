"""Where a sweep's MLflow store is, and whether it can serve one: the URI a sweep, the report and
the UI agree on (`resolve_tracking_uri`), a check that refuses a bad one in seconds without creating
anything (`check_tracking_uri`, `check_reachable`), short HTTP timeouts (`fail_fast_environment`)
and the opening of a store's client (`open_client`), whose new SQLite file only its owner may read
(`private_file`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from samtune.contract.messages import has_masked_secret, masked, without_credentials

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri`, else ``MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in this folder.

    The local default is an absolute path so the UI, the report and the Ray workers all open the
    same store whatever their working directory. A `uri` whose secrets were masked (``sweep.json``
    keeps it so, `samtune.contract.messages.masked`) is ``MLFLOW_TRACKING_URI`` where that is the
    same URI with its secrets; otherwise it stays masked, and `check_tracking_uri` refuses it.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and env and has_masked_secret(uri) and masked(env) == uri:
        return env
    uri = uri or env
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if "://" not in uri and not uri.startswith("sqlite:"):
        # A bare folder is a file store.
        return "file://" + os.path.abspath(uri)
    return uri


def fail_fast_environment() -> None:
    """Short HTTP timeouts and few retries, so an unreachable server is noticed in seconds.

    MLflow's defaults retry for minutes; a sweep must not stall on a dead tracking server.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    # MLflow's client prints a "View run ... at: <server URL>" pair of lines for every run it
    # ends on a server: dozens a sweep, over the live view, and the URL is the tracking URI with
    # whatever password it carries. The sweep names its runs' address itself, masked.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow logs every failed SQLite statement (a lock another process holds, say) with two
    # tracebacks at ERROR; the tracker says in one line what failed and what became of the
    # records, so those would only bury it.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


#: How long the end of a sweep waits for a store that does not take its last records (a SQLite
#: file another process holds locked, a server restarting) before it leaves them in the spool.
STORE_WAIT_S = 120.0


def store_wait_s() -> float:
    """`STORE_WAIT_S`, or the seconds ``SAMTUNE_STORE_WAIT_S`` says (0: do not wait)."""
    text = os.environ.get("SAMTUNE_STORE_WAIT_S", "").strip()
    try:
        return max(0.0, float(text)) if text else STORE_WAIT_S
    except ValueError:
        raise ValueError(f"SAMTUNE_STORE_WAIT_S={text!r}: expected a number of seconds") from None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError naming `uri` (its password masked) when an http(s) tracking server
    does not answer.

    Asked without the login a URI may carry (``http://user:password@host``): urllib would take
    ``user:password@host`` for the host name, and any answer, a refusal to log in included, says
    the server is up.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(without_credentials(uri).rstrip("/") + "/health", timeout=timeout).read()
    except urllib.error.HTTPError:
        return  # it answered: some servers have no /health, but they are up
    except Exception as exc:  # noqa: BLE001
        raise ConnectionError(f"MLflow tracking server {masked(uri)} is not reachable ({masked(str(exc))})") from None


def check_tracking_uri(uri: str) -> None:
    """Raise ValueError (one line) for a URI no MLflow tracking store serves, ConnectionError for
    an http(s) server that does not answer; creates nothing.

    A local store (``sqlite:``, ``file:``) is judged by its folder, without opening it: opening
    creates it, and a sweep refused for another reason must leave no store behind. Any other
    scheme is handed to MLflow's client, which knows the installed store plugins. A URI whose
    secrets are masked (``***``: as samtune prints and saves it) is refused, saying how to give them.
    """
    if has_masked_secret(uri):
        raise ValueError(
            f"{uri}: its credentials are masked (samtune neither prints them nor saves them in sweep.json); "
            f"give the URI with them again (--tracking-uri or MLFLOW_TRACKING_URI), or keep them out of it: "
            f"MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        check_reachable(uri)
        return
    if scheme in ("sqlite", "file"):
        # SQLAlchemy's form: sqlite:///relative.db, sqlite:////absolute.db.
        path = uri[len("sqlite:///") :] if scheme == "sqlite" else urlparse(uri).path
        if not uri.startswith("sqlite:///") and scheme == "sqlite" or not path:
            raise ValueError(f"{uri}: expected sqlite:///path/to/mlflow.db (a file, not an in-memory store)")
        if scheme == "sqlite" and os.path.isdir(path):
            raise ValueError(
                f"{uri}: {path} is a folder; name the store's file in it, e.g. "
                f"sqlite:///{os.path.join(path, 'mlflow.db')}"
            )
        folder = os.path.abspath(os.path.dirname(path) if scheme == "sqlite" else path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{uri}: cannot write in {folder}")
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri)
    except Exception as exc:  # noqa: BLE001  MLflow's registry, a missing driver, a bad host
        if "unsupported URI" in str(exc) or "registered tracking store" in str(exc):
            raise ValueError(
                f"{masked(uri)}: not an MLflow tracking URI (scheme {scheme + '://' if scheme else 'missing'}); "
                f"use sqlite:///path/mlflow.db, a folder, or http(s)://host:port"
            ) from None
        raise ValueError(
            f"{masked(uri)}: {type(exc).__name__}: {masked(str(exc)).strip().splitlines()[0][:200]}"
        ) from None


def private_file(path: str | os.PathLike) -> None:
    """Create ``path`` empty, readable by its owner only, unless it exists: a new SQLite store
    holds every run's settings and results, and SQLite would create it world-readable (0644
    under the usual umask) where the sweep's own folder is 0700. An empty file is an empty
    SQLite database."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def new_sqlite_file(uri: str) -> str | None:
    """The SQLite file opening the store at `uri` will create, if it does not exist yet."""
    db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    return db if db and not os.path.exists(db) else None


def open_client(uri: str, created_file: str | None) -> MlflowClient:
    """A client of the store at `uri`; `created_file` (`new_sqlite_file`) is made private first."""
    from mlflow.tracking import MlflowClient

    with creating_store(uri):
        if created_file:
            private_file(created_file)
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # the tables exist once this returns
            return client
        except Exception:  # noqa: BLE001
            # A process that does not take the lock (`mlflow ui` started by hand) creating the
            # store at the same moment: it has made the tables a moment later.
            time.sleep(1.0)
            return MlflowClient(uri)


@contextmanager
def creating_store(uri: str) -> Iterator[None]:
    """For a SQLite store, one samtune process at a time opens it (and so creates its tables).

    MLflow creates a new SQLite store's tables on first use, without a lock: two sweeps, or a
    sweep and `samtune ui`, started together on a new ``mlflow.db`` both run the migrations, and
    one fails ("table ... already exists") or records nothing. An exclusive lock on a file
    beside the store (``<store>.lock``, left there: removing a lock file another process may be
    waiting on would let a third one in) serialises the opening; once the tables exist it costs
    a moment.
    """
    db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if not db or db == ":memory:":
        yield
        return
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock

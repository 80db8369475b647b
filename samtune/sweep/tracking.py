"""MLflow records of a sweep, written from the sweep driver, tolerant of the tracking server.

Layout (what `samtune.report` reads; one writer, the sweep driver):

- Experiment: the sweep's name (``Sweep.name``, e.g. ``noisy-digits``).
- Sweep run (one per sweep), run name = the sweep's name. Tags: ``samtune.role=sweep``,
  ``samtune.key=<sweep>`` where ``<sweep>`` is ``<sweep name>@<sweep id>`` (the id is made when
  the sweep starts and kept in its ``sweep.json``, so a new sweep of the same name, e.g. with
  another ``--storage-path``, gets new runs while ``--resume`` continues its own),
  ``samtune.sweep_id``, ``samtune.space_file=<absolute path>``, ``samtune.status``.
  Params: every `Sweep` field (``label_noise_rates`` as a JSON list) and ``fixed.<key>`` for each
  fixed trial setting. Artifacts: the report (``report/``), written by `samtune.report`.
- Cell run (one per scenario cell), run name = the cell label (``noise=0.4``; ``noise=0.4
  pairflip`` for non-symmetric noise). Tags: ``samtune.role=cell``, ``samtune.cell=<label>``,
  ``samtune.key=<sweep>/<cell slug>``, ``samtune.status``, ``mlflow.parentRunId=<sweep run id>``.
  Params: ``scenario``, ``label_noise_rate``, ``label_noise_kind``.
- Trial run (one per Tune trial, however often it restarts or the sweep resumes), run name
  ``<cell label> <tune trial id>``. Tags: ``samtune.role=trial``, ``samtune.cell=<label>``,
  ``samtune.trial_key=<sweep>/<cell slug>/<tune trial id>`` (stable; also ``samtune.key``),
  ``mlflow.parentRunId=<cell run id>``, ``samtune.status`` = ``running`` while it trains, then
  ``finished`` (all epochs), ``stopped`` (ASHA ended it early), ``diverged`` (non-finite loss; its
  last result has ``diverged=1`` and ``val_error = test_error = 1``) or ``failed`` (it raised after
  its restarts). Params: every key of the trial config (space values, scenario, cell, model,
  epochs, seed, dataset, data subset, ...); None is ``"None"``, tuples are JSON lists. Metrics,
  ``step = epoch`` (1-based), one value per step: every per-epoch metric the trial reports (the
  names in `samtune.contract.metrics.METRICS`) and ``sharpness/<measure>[/<setting>]`` at the
  epochs they were measured. Non-finite values are never logged. Tags
  ``samtune.placement``: the Ray node id of each worker in rank order (the latest start's);
  ``samtune.error`` on a failed trial: its exception's last line; ``samtune.sharpness_skipped``
  where ``sharpness_budget_s`` skipped measures: which, and the seconds each was expected to take.
- Lost trial run: a trial run whose trial a resumed Tune never heard of (the driver was killed
  between the trial's start and the next save of Tune's state; another trial ran in its place)
  gets ``samtune.role=lost`` and ``samtune.status=lost`` once its cell is finished, its epochs
  kept, so a cell's trial runs are its budget.
- Confirmation run (`samtune.sweep.confirm`), nested under its cell run, one per pick and seed:
  ``samtune.role=confirm`` (``ablation`` for the m ablation), ``samtune.confirms=<pick>``,
  ``samtune.seed=<seed>``, params and metrics as a trial's. The cell run's ``samtune.aliases``
  names picks run once for two names, and its dataset input describes the cell's data; the
  sweep run's description (``mlflow.note.content``) holds the verdict table, with
  ``verdicts.json``/``verdicts.md`` as its artifacts.
- MLflow run status: FINISHED for ``finished``/``stopped``/``diverged``, FAILED for ``failed``;
  KILLED for runs left open when a sweep is interrupted (``samtune.status`` stays ``running``; a
  resumed sweep reopens the same runs and finishes them).

``samtune.key`` is the identity a run is found by again: a resumed sweep or a restarted trial
continues its run instead of starting a second one, and a step already logged is never logged
twice (the run's ``epoch`` history says which steps exist).

Writes go through a queue that a background thread drains (``background=True``, what a sweep
uses), so the Tune loop never waits on MLflow: each trial's report waits for the driver to take
the previous one, and a SQLite write costs about 15 ms per result (opening a new store about
2.5 s, which overlaps Ray's start). `flush()` and `close()` write from the calling thread
and return once the queue is empty or a write failed. When the tracking server fails, training
goes on: the pending records stay queued and are written to a JSON-lines spool file named in the
warning (one record a line: ``run`` key, its ``name``, ``tags`` and ``parent`` chain, ``kind`` =
params | metrics | tags | status | artifacts, ``step``, ``data``). They are retried on later writes,
backing off from ``retry_after_s`` up to two minutes between attempts, and once more at the end;
`close()` names the spool when records are left in it. A later `Tracker` on the same spool (``--resume``) loads it
and writes those records first, so nothing is lost between driver processes. Each attempt is
bounded by short HTTP timeouts (`fail_fast_environment`): the sweep never hangs on MLflow.

A write that timed out may still have reached the server, so the first metrics write to a run
after a failure asks the server which steps it already has before writing again. A record the
server refuses for good (an MLflow error such as ``INVALID_PARAMETER_VALUE``, e.g. a metric name
MLflow does not allow) would block every record behind it: it is moved to
``<spool>.rejected.jsonl`` (same format), with a warning, and the queue goes on.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from samtune.contract.tags import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    KEY_TAG,
    NOTE_TAG,
    ROLE_TAG,
    STATUS_TAG,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


STATUSES = ("running", "finished", "stopped", "diverged", "failed")


_MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "diverged": "FINISHED",
                  "failed": "FAILED"}


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri`, else ``MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in this folder.

    The local default is an absolute path so the UI, the report and the Ray workers all open the
    same store whatever their working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
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


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError naming `uri` when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except urllib.error.HTTPError:
        return  # it answered: some servers have no /health, but they are up
    except Exception as exc:  # noqa: BLE001
        raise ConnectionError(f"MLflow tracking server {uri} is not reachable ({exc})") from None


def check_tracking_uri(uri: str) -> None:
    """Raise ValueError (one line) for a URI no MLflow tracking store serves, ConnectionError for
    an http(s) server that does not answer; creates nothing.

    A local store (``sqlite:``, ``file:``) is judged by its folder, without opening it: opening
    creates it, and a sweep refused for another reason must leave no store behind. Any other
    scheme is handed to MLflow's client, which knows the installed store plugins.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        check_reachable(uri)
        return
    if scheme in ("sqlite", "file"):
        # SQLAlchemy's form: sqlite:///relative.db, sqlite:////absolute.db.
        path = uri[len("sqlite:///"):] if scheme == "sqlite" else urlparse(uri).path
        if not uri.startswith("sqlite:///") and scheme == "sqlite" or not path:
            raise ValueError(f"{uri}: expected sqlite:///path/to/mlflow.db (a file, not an in-memory store)")
        if scheme == "sqlite" and os.path.isdir(path):
            raise ValueError(f"{uri}: {path} is a folder; name the store's file in it, e.g. "
                             f"sqlite:///{os.path.join(path, 'mlflow.db')}")
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
            raise ValueError(f"{uri}: not an MLflow tracking URI (scheme {scheme + '://' if scheme else 'missing'}); "
                             f"use sqlite:///path/mlflow.db, a folder, or http(s)://host:port") from None
        raise ValueError(f"{uri}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}") from None


def _quoted(value: str) -> str:
    """`value` as an MLflow search-filter string literal (which has no escapes: pick the quote)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"run key {value!r} holds both kinds of quote; MLflow cannot search for it")


# MLflow errors that a retry cannot fix: the record itself is refused.
_PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST"})


def _is_permanent(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and getattr(exc, "error_code", None) in _PERMANENT


@dataclass
class _RunSpec:
    key: str
    name: str
    tags: dict[str, str]
    parent: str | None = None
    run_id: str | None = None
    last_step: int = 0


@dataclass
class _Op:
    kind: str                # "params" | "metrics" | "tags" | "status" | "end" | "artifacts"
    key: str
    payload: Any
    step: int | None = None
    described: dict = field(default_factory=dict)


def private_file(path: str | os.PathLike) -> None:
    """Create ``path`` empty, readable by its owner only, unless it exists: a new SQLite store
    holds every run's settings and results, and SQLite would create it world-readable (0644
    under the usual umask) where the sweep's own folder is 0700. An empty file is an empty
    SQLite database."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


class Tracker:
    """The sweep's MLflow writer. Runs are named by keys; MLflow ids are resolved lazily."""

    def __init__(self, tracking_uri: str, experiment: str, spool_path: str | os.PathLike,
                 retry_after_s: float = 10.0, replay_hint: str | None = None, background: bool = False):
        """`replay_hint`: the command that writes a left-over spool later, named in messages.
        `background`: write from a thread of this tracker's own (the store is opened there too:
        `wait_open` says whether it could be)."""
        fail_fast_environment()
        self.uri = tracking_uri
        self.experiment = experiment
        self.spool_path = str(spool_path)
        self.rejected_path = self.spool_path.removesuffix(".jsonl") + ".rejected.jsonl"
        self.replay_hint = replay_hint
        self._client: MlflowClient | None = None
        # The SQLite file opening the store will create, if it does not exist yet (`discard`).
        db = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
        self._created_file = db if db and not os.path.exists(db) else None
        self._open_error: BaseException | None = None
        self._opened = threading.Event()
        # `_lock` guards the queue and the failure state; `_writing` lets one drainer at a time
        # write, so records reach MLflow in the order they were submitted.
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self.retry_after_s = retry_after_s
        self._experiment_id: str | None = None
        self._runs: dict[str, _RunSpec] = {}
        self._queue: list[_Op] = []
        self._ended: set[str] = set()
        # Runs whose last write failed: the server may hold more steps than `last_step` says.
        self._unsure: set[str] = set()
        self._last_failure = 0.0
        self._backoff_s = retry_after_s
        self._warned = False
        self.failures = 0
        self.rejected = 0
        self._load_spool()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._background, name="samtune-mlflow", daemon=True)
            self._thread.start()
        else:
            self._open()

    # -- the store ------------------------------------------------------------------------------
    def _open(self) -> None:
        if self._opened.is_set():
            return
        from mlflow.tracking import MlflowClient

        try:
            if self._created_file:
                private_file(self._created_file)
            try:
                self._client = MlflowClient(self.uri)
            except Exception:  # noqa: BLE001
                # Two processes creating one new SQLite store at once (a sweep and `samtune ui`,
                # say) race through its table migrations; the loser finds it made a moment later.
                time.sleep(1.0)
                self._client = MlflowClient(self.uri)
        except BaseException as exc:  # noqa: BLE001  re-raised where the client is needed
            self._open_error = exc
        finally:
            self._opened.set()
        if self._open_error is not None and not self._thread:
            raise self._open_error

    def discard(self) -> None:
        """Give up before anything was written (the sweep could not start): stop the writer and
        remove the SQLite file opening the store created, so a refused sweep leaves no store."""
        self._stop_writer()
        if self._created_file and not self._queue and os.path.exists(self._created_file):
            self._client = None
            os.remove(self._created_file)

    def _stop_writer(self) -> None:
        if self._thread is not None:
            with self._wake:
                self._closing = True
                self._wake.notify_all()
            self._thread.join()
            self._thread = None

    def wait_open(self, timeout: float | None = None) -> None:
        """Wait until the store is open; raise what opening it raised."""
        self._opened.wait(timeout)
        if self._open_error is not None:
            raise self._open_error

    @property
    def client(self) -> MlflowClient:
        self.wait_open()
        assert self._client is not None  # open (`wait_open` raised otherwise) and not discarded
        return self._client

    @client.setter
    def client(self, value: MlflowClient) -> None:
        self.wait_open()
        self._client = value

    def _background(self) -> None:
        self._open()
        if self._open_error is not None:
            return  # `wait_open` raises it to the sweep; nothing can be written
        while True:
            with self._wake:
                while not self._closing and (not self._queue or self._backoff_left() > 0):
                    # During a back-off, wait it out (or until close() asks for the end).
                    self._wake.wait(timeout=self._backoff_left() if self._queue else None)
                if self._closing:
                    return  # close() writes what is left, from its own thread
            self.flush()

    def _backoff_left(self) -> float:
        if not self.failures or not self._last_failure:
            return 0.0
        return max(0.0, self._backoff_s - (time.monotonic() - self._last_failure))

    # -- declaring runs -------------------------------------------------------------------------
    def declare(self, key: str, name: str, role: str, parent: str | None = None,
                **tags: str) -> None:
        """Declare the run `key` (created, or found again, on first write)."""
        if key not in self._runs:
            all_tags = {KEY_TAG: key, ROLE_TAG: role, "mlflow.runName": name, **tags}
            self._runs[key] = _RunSpec(key, name, {k: str(v) for k, v in all_tags.items()}, parent)

    def run_id(self, key: str) -> str | None:
        """The MLflow run id of `key` if it has been created (None while the server is away)."""
        spec = self._runs.get(key)
        return spec.run_id if spec else None

    # -- writes ---------------------------------------------------------------------------------
    def log_params(self, key: str, params: dict[str, Any]) -> None:
        self._submit(_Op("params", key, {k: _param_text(v) for k, v in params.items()}))

    def log_metrics(self, key: str, metrics: dict[str, Any], step: int) -> None:
        """Log the finite numeric values of `metrics` at `step` (a step already logged is skipped)."""
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            self._submit(_Op("metrics", key, clean, step=int(step)))

    def set_tags(self, key: str, tags: dict[str, Any]) -> None:
        self._submit(_Op("tags", key, {k: str(v) for k, v in tags.items()}))

    def set_status(self, key: str, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown trial status {status!r}; expected one of {STATUSES}")
        if status in _MLFLOW_STATUS:
            self._ended.add(key)
        else:
            self._ended.discard(key)
        self._submit(_Op("status", key, status))

    def log_artifacts(self, key: str, folder: str | os.PathLike) -> None:
        self._submit(_Op("artifacts", key, str(folder)))

    def log_dataset(self, key: str, name: str, digest: str, source: str, profile: dict[str, Any]) -> None:
        """An MLflow dataset input of run `key` (what the UI's Datasets column shows)."""
        self._submit(_Op("dataset", key, {"name": name, "digest": digest, "source_type": "samtune",
                                          "source": source, "profile": json.dumps(profile)}))

    def retire_unknown_trials(self, cell_key: str, known: set[str]) -> list[str]:
        """Mark as lost every trial run under `cell_key` whose trial id is not in `known`.

        A driver killed in the moment between a trial's start (its run is created then) and the
        next save of Tune's state leaves a run for a trial the resumed Tune never heard of; Tune
        runs another trial in its place. That run is kept, for its epochs, but with
        ``samtune.role=lost`` (``samtune.status=lost``, MLflow KILLED), so the trials of a cell
        are its budget, each once. Returns the trial keys retired; writes synchronously (this
        is a resumed sweep finishing a cell, not the Tune loop).
        """
        if not self.flush():
            return []  # the store is away: left for the next --resume
        experiment = self._experiment()
        runs = self.client.search_runs(
            [experiment], filter_string=f"tags.`{ROLE_TAG}` = 'trial' and tags.`{KEY_TAG}` LIKE "
                                        f"{_quoted(cell_key + '/%')}", max_results=10_000)
        retired = []
        for run in runs:
            key = run.data.tags.get(KEY_TAG, "")
            if not key.startswith(cell_key + "/") or key.rsplit("/", 1)[-1] in known:
                continue
            self.client.set_tag(run.info.run_id, ROLE_TAG, "lost")
            self.client.set_tag(run.info.run_id, STATUS_TAG, "lost")
            self.client.set_tag(run.info.run_id, NOTE_TAG,
                                "started by a sweep driver that was killed before Tune saved it; "
                                "another trial ran in its place")
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
            self._runs.pop(key, None)
            retired.append(key)
        return retired

    def end_open_runs(self) -> None:
        """Mark KILLED every run created here that got no final status (the sweep was
        interrupted), so none stays RUNNING in the UI; a resumed sweep reopens them."""
        with self._lock:
            queued = {op.key for op in self._queue}
        for key, spec in list(self._runs.items()):
            if key not in self._ended and (spec.run_id is not None or key in queued):
                self._submit(_Op("end", key, "KILLED"))

    def flush(self) -> bool:
        """Try to write everything queued, from this thread; True when nothing is left."""
        if self._open_error is not None:
            return False
        with self._writing:
            while True:
                with self._lock:
                    if not self._queue:
                        break
                    op = self._queue[0]
                try:
                    self._apply(op)
                except Exception as exc:  # noqa: BLE001  any client/server error: keep it queued
                    self._unsure.add(op.key)
                    with self._lock:
                        if _is_permanent(exc):
                            self._reject(op, exc)
                            continue
                        self._failed(exc)
                    return False
                with self._lock:
                    self._queue.pop(0)
            with self._lock:
                self._backoff_s = self.retry_after_s
                self._last_failure = 0.0  # no back-off once the server took everything
                if os.path.exists(self.spool_path):
                    os.remove(self.spool_path)  # everything reached the server after all
        return True

    def close(self) -> str | None:
        """Stop the writer thread and flush a last time. Returns a message naming what could not
        be written, or None."""
        self._stop_writer()
        rejected = (f"{self.rejected} record(s) MLflow refused are in {self.rejected_path}"
                    if self.rejected else None)
        if self._open_error is not None:
            with self._lock:
                if self._queue:
                    self._spool()
            return (f"MLflow at {self.uri} could not be opened ({_first_line(self._open_error)}): "
                    f"{len(self._queue)} record(s) were not logged; they are saved in {self.spool_path}")
        if self.flush():
            return rejected
        replay = f"; `{self.replay_hint}` writes them" if self.replay_hint else ""
        return (f"MLflow at {self.uri} could not be reached: {len(self._queue)} record(s) were not "
                f"logged; they are saved in {self.spool_path}{replay}" + (f"; {rejected}" if rejected else ""))

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- internals ------------------------------------------------------------------------------
    def _submit(self, op: _Op) -> None:
        with self._lock:
            self._queue.append(op)
            failed_lately = len(self._queue) > 1 and time.monotonic() - self._last_failure < self._backoff_s
            if failed_lately:
                self._spool()  # the server failed a moment ago: don't stall the driver on every write
            # A writer thread that died (a bug, a full disk while spooling) leaves the writes to
            # the caller, as without one.
            if self._thread is not None and self._thread.is_alive():
                if not failed_lately:
                    self._wake.notify()
                return
        if not failed_lately:
            self.flush()

    def _failed(self, exc: Exception) -> None:
        if self.failures:  # failing again: wait longer before the next attempt
            self._backoff_s = min(120.0, self._backoff_s * 2)
        self.failures += 1
        self._last_failure = time.monotonic()
        self._spool()
        if not self._warned:
            self._warned = True
            replay = f" (or later by `{self.replay_hint}`)" if self.replay_hint else ""
            log.warning("MLflow at %s failed (%s); training goes on, records are kept in %s "
                        "and retried%s", self.uri, _first_line(exc),
                        self.spool_path, replay)

    def _reject(self, op: _Op, exc: Exception) -> None:
        """Set aside a record the server refuses for good, so the ones behind it get written."""
        self._queue.remove(op)
        self.rejected += 1
        os.makedirs(os.path.dirname(os.path.abspath(self.rejected_path)), exist_ok=True)
        with open(self.rejected_path, "a") as fh:
            fh.write(json.dumps({**self._record(op), "error": _first_line(exc)}, default=str) + "\n")
        log.warning("MLflow refused a %s record of run %s (%s); it is saved in %s and not retried",
                    op.kind, op.key, _first_line(exc), self.rejected_path)
        if os.path.exists(self.spool_path):
            self._spool()  # the spool must not replay what was set aside

    def _record(self, op: _Op) -> dict[str, Any]:
        spec = self._runs.get(op.key)
        return {"run": op.key, "name": spec.name if spec else op.key, "tags": spec.tags if spec else {},
                "parent": spec.parent if spec else None, "ancestors": self._ancestors(op.key),
                "kind": op.kind, "step": op.step, "data": op.payload}

    def _spool(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.spool_path)), exist_ok=True)
        with open(self.spool_path + ".tmp", "w") as fh:
            for op in self._queue:
                fh.write(json.dumps(self._record(op), default=str) + "\n")
        os.replace(self.spool_path + ".tmp", self.spool_path)

    def _ancestors(self, key: str) -> list[dict[str, Any]]:
        """The parent chain of run `key` (nearest first), enough to create it from a spool."""
        chain = []
        spec = self._runs.get(key)
        while spec is not None and spec.parent is not None:
            spec = self._runs.get(spec.parent)
            if spec is None:
                break
            chain.append({"run": spec.key, "name": spec.name, "tags": spec.tags, "parent": spec.parent})
        return chain

    def _load_spool(self) -> None:
        """Queue the records an earlier driver could not write (a spool it left behind)."""
        if not os.path.exists(self.spool_path):
            return
        with open(self.spool_path) as fh:
            lines = [line for line in fh if line.strip()]
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the rest still counts
            for run in [*reversed(rec.get("ancestors") or []), rec]:
                if run["run"] not in self._runs:
                    self._runs[run["run"]] = _RunSpec(run["run"], run.get("name") or run["run"],
                                                      dict(run.get("tags") or {}), run.get("parent"))
            self._queue.append(_Op(rec["kind"], rec["run"], rec["data"], step=rec.get("step")))

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            self._experiment_id = (found.experiment_id if found is not None
                                   else self.client.create_experiment(self.experiment))
            # The MLflow UI opens an experiment of no kind on its GenAI traces; this one holds
            # training runs, and says so.
            self.client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return self._experiment_id

    def _resolve(self, key: str) -> str:
        spec = self._runs[key]
        if spec.run_id is not None:
            return spec.run_id
        experiment = self._experiment()
        found = self.client.search_runs([experiment], filter_string=f"tags.`{KEY_TAG}` = {_quoted(key)}",
                                        max_results=1)
        if found:
            spec.run_id = found[0].info.run_id
            # Continue after the last logged epoch: a resumed trial never logs a step twice.
            history = self.client.get_metric_history(spec.run_id, "epoch")
            spec.last_step = max((m.step for m in history), default=0)
            if found[0].info.status != "RUNNING":
                self.client.update_run(spec.run_id, status="RUNNING")
            return spec.run_id
        tags = dict(spec.tags)
        if spec.parent is not None:
            tags["mlflow.parentRunId"] = self._resolve(spec.parent)
        run = self.client.create_run(experiment, tags=tags, run_name=spec.name)
        spec.run_id = run.info.run_id
        return spec.run_id

    def _apply(self, op: _Op) -> None:
        from mlflow.entities import Metric, Param

        run_id = self._resolve(op.key)
        spec = self._runs[op.key]
        if op.kind == "params":
            existing = self.client.get_run(run_id).data.params
            params = [Param(k, v) for k, v in op.payload.items() if k not in existing]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i:i + 100])
        elif op.kind == "metrics":
            if op.key in self._unsure:
                # The failed attempt may have reached the server before it timed out: a step the
                # run already has is not logged a second time. The last metric of the record is
                # the one written last (batches go in order), so its presence means all of it.
                last_key = list(op.payload)[-1]
                logged = self.client.get_metric_history(run_id, last_key)
                spec.last_step = max([spec.last_step] + [m.step for m in logged])
                self._unsure.discard(op.key)
            assert op.step is not None  # a metrics record always has its step
            if op.step <= spec.last_step:
                return
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, op.step) for k, v in op.payload.items()]
            for i in range(0, len(metrics), 500):
                self.client.log_batch(run_id, metrics=metrics[i:i + 500])
            spec.last_step = op.step
        elif op.kind == "status":
            self.client.set_tag(run_id, STATUS_TAG, op.payload)
            if op.payload in _MLFLOW_STATUS:
                self.client.set_terminated(run_id, status=_MLFLOW_STATUS[op.payload])
        elif op.kind == "tags":
            for name, value in op.payload.items():
                self.client.set_tag(run_id, name, value)
        elif op.kind == "end":
            self.client.set_terminated(run_id, status=op.payload)
        elif op.kind == "artifacts":
            self.client.log_artifacts(run_id, op.payload)
        elif op.kind == "dataset":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            self.client.log_inputs(run_id, [DatasetInput(
                Dataset(**op.payload), tags=[InputTag("mlflow.data.context", "training")])])
        else:  # pragma: no cover - internal
            raise ValueError(op.kind)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]  # MLflow's limit on a param value

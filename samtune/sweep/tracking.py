"""MLflow records of a sweep, written from the sweep driver, tolerant of the tracking server.

Layout (what `samtune.report` reads; one writer, the sweep driver):

- Experiment: the sweep's name (``Sweep.name``, e.g. ``noisy-digits``).
- Sweep run (one per sweep), run name ``<sweep name> <sweep id>``. Tags: ``samtune.role=sweep``,
  ``samtune.key=<sweep>`` where ``<sweep>`` is ``<sweep name>@<sweep id>`` (the id is made when
  the sweep starts and kept in its ``sweep.json``, so a new sweep of the same name, e.g. with
  another ``--storage-path``, gets new runs while ``--resume`` continues its own),
  ``samtune.sweep_id``, ``samtune.space_file=<absolute path>``, ``samtune.status``.
  Params: every `Sweep` field (``label_noise_rates`` as a JSON list) and ``fixed.<key>`` for each
  fixed trial setting. Artifacts: the report (``report/``), written by `samtune.report`.
- Cell run (one per scenario cell), run name = the cell label (``noise=0.4``; ``noise=0.4
  pairflip`` for non-symmetric noise). Tags: ``samtune.role=cell``, ``samtune.cell=<label>``,
  ``samtune.key=<sweep>/<cell slug>``, ``samtune.status``, ``mlflow.parentRunId=<sweep run id>``,
  and after its search ``samtune.picks=best_sgd:<trial key>,best_sam:<trial key>``: the trials it
  picked, each holding its final weights as an MLflow model (below); in the one cell where the
  sweep measured it (`samtune.sweep.spectra`), ``samtune.spectral_density=spectral_density.json``
  and that artifact: the picks' Hessian eigenvalue density.
  Params: ``scenario``, ``label_noise_rate``, ``label_noise_kind``.
- Trial run (one per Tune trial, however often it restarts or the sweep resumes), run name:
  cell, optimizer, the headline settings its search chose, ``baseline`` for a declared baseline,
  its number in the cell's search (``noise=0.4 SAM lr=0.12 rho=0.05 m=16 #3``;
  `samtune.sweep.run_names`). Tags: ``samtune.role=trial``, ``samtune.cell=<label>``,
  ``samtune.trial_key=<sweep>/<cell slug>/<tune trial id>`` (stable; also ``samtune.key``),
  ``mlflow.parentRunId=<cell run id>``, ``samtune.status`` = ``running`` while it trains, then
  ``finished`` (all epochs), ``stopped`` (ASHA ended it early), ``diverged`` (non-finite loss; its
  last result has ``diverged=1`` and ``val_error = test_error = 1``) or ``failed`` (it raised after
  its restarts). Params: every key of the trial config (space values, scenario, cell, model,
  epochs, seed, dataset, data subset, ...); None is ``"None"``, tuples are JSON lists; and the
  settings of its sharpness measurement, fixed for the trial
  (`samtune.contract.metrics.is_sharpness_setting`): ``sharpness/<measure>/<setting>`` (a number,
  or a text setting's value), ``sharpness/subset|seed|batch|num_params``,
  ``sharpness/params/<name>=1``. Metrics, ``step = epoch`` (1-based), one value per step: every
  per-epoch metric the trial reports (the names in `samtune.contract.metrics.METRICS`) and, at the
  epochs they were measured, ``sharpness/<measure>`` with its cost and uncertainty
  (``sharpness/<measure>/seconds|products|residual|stderr``, ``.../skipped|expected_s|left_s``).
  Non-finite values are never logged. A pick of its cell's search (``samtune.picks``) has its last
  checkpoint's weights as the MLflow model ``model`` (`samtune.sweep.pick_models`):
  ``mlflow.pytorch.load_model(f"runs:/{run_id}/model")``. Tags
  ``samtune.placement``: the Ray node id of each worker in rank order (the latest start's);
  ``samtune.error`` on a failed trial: its exception's last line; ``samtune.sharpness_skipped``
  where ``sharpness_budget_s`` skipped measures: which, and the seconds each was expected to take.
- Lost trial run: a trial run whose trial a resumed Tune never heard of (the driver was killed
  between the trial's start and the next save of Tune's state; another trial ran in its place)
  gets ``samtune.role=lost`` and ``samtune.status=lost`` once its cell is finished, its epochs
  kept, so a cell's trial runs are its budget.
- Confirmation run (`samtune.sweep.confirm`), nested under its cell run, one per pick and seed,
  run name ``<cell label> <pick> seed <seed>`` (``noise=0.4 best_sam seed 2``, ``noise=0.4 m=16
  seed 2``): ``samtune.role=confirm`` (``ablation`` for the m ablation), ``samtune.confirms=<pick>``,
  ``samtune.seed=<seed>``, params and metrics as a trial's. The cell run's ``samtune.aliases``
  names picks run once for two names, and its dataset input describes the cell's data; the
  sweep run's description (``mlflow.note.content``) holds the verdict table, with
  ``verdicts.json``/``verdicts.md`` as its artifacts, and, once the report is built, the
  claims table below it (`samtune.report.claims.with_claims`).
- MLflow run status: FINISHED for ``finished``/``stopped``/``diverged``, FAILED for ``failed``;
  KILLED for runs left open when a sweep is interrupted (``samtune.status`` stays ``running``; a
  resumed sweep reopens the same runs and finishes them).

``samtune.key`` is the identity a run is found by again: a resumed sweep or a restarted trial
continues its run instead of starting a second one, and a step already logged is never logged
twice (the run's ``epoch`` history says which steps exist). Run names are for reading only: a
run found again under another name (an older samtune's) is renamed as this one names it.
Runs of older sweeps hold their sharpness settings as metric series; the report reads both.


Writing is in parts: the runs by key (`samtune.sweep.run_keys`), one record written to its run
(`samtune.sweep.run_writes`), the queue that keeps training from waiting on MLflow and retries
what failed (`samtune.sweep.write_queue`), the spool that keeps what is not written yet
(`samtune.sweep.spool`), and where the store is (`samtune.sweep.store`, whose names this module
also offers). `close()` names the spool when records are left in it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from typing import TYPE_CHECKING, Any

from samtune.contract.messages import masked
from samtune.sweep.run_keys import RunKeys
from samtune.sweep.run_writes import MLFLOW_STATUS, RunWriter
from samtune.sweep.spool import Record, Spool, failure_text
from samtune.sweep.store import (
    DEFAULT_TRACKING_URI,
    check_reachable,
    check_tracking_uri,
    fail_fast_environment,
    new_sqlite_file,
    open_client,
    private_file,
    resolve_tracking_uri,
    store_wait_s,
)
from samtune.sweep.write_queue import WriteQueue

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "DEFAULT_TRACKING_URI",
    "STATUSES",
    "Tracker",
    "check_reachable",
    "check_tracking_uri",
    "fail_fast_environment",
    "private_file",
    "resolve_tracking_uri",
    "store_wait_s",
]


STATUSES = ("running", "finished", "stopped", "diverged", "failed")

# The tracker's warnings: one logger says what became of the records.
log = logging.getLogger("samtune.sweep.tracking")


class Tracker:
    """The sweep's MLflow writer. Runs are named by keys; MLflow ids are resolved lazily."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        spool_path: str | os.PathLike,
        retry_after_s: float = 10.0,
        replay_hint: str | None = None,
        background: bool = False,
    ):
        """`replay_hint`: the command that writes a left-over spool later, named in messages.
        `background`: write from a thread of this tracker's own (the store is opened there too:
        `wait_open` says whether it could be)."""
        fail_fast_environment()
        self.uri = tracking_uri
        # What messages name: the URI without its credentials.
        self.shown_uri = masked(tracking_uri)
        self.experiment = experiment
        self.replay_hint = replay_hint
        self.retry_after_s = retry_after_s
        self._client: MlflowClient | None = None
        # The SQLite file opening the store will create, if it does not exist yet (`discard`).
        self._created_file = new_sqlite_file(tracking_uri)
        self._open_error: BaseException | None = None
        self._opened = threading.Event()
        self._ended: set[str] = set()
        self._runs = RunKeys(experiment, lambda: self.client)
        self._spool = Spool(spool_path, self._runs)
        self._queue = WriteQueue(
            RunWriter(self._runs, lambda: self.client),
            self._spool,
            lambda: self._open_error is None,
            retry_after_s,
            self.shown_uri,
            replay_hint,
        )
        self._queue.records.extend(self._spool.load())
        if background:
            self._queue.start(self._open)
        else:
            self._open()
            if self._open_error is not None:
                raise self._open_error

    @property
    def spool_path(self) -> str:
        return self._spool.path

    @property
    def rejected_path(self) -> str:
        return self._spool.rejected_path

    @property
    def failures(self) -> int:
        return self._queue.failures

    @property
    def rejected(self) -> int:
        return self._spool.rejected

    # -- the store ------------------------------------------------------------------------------
    def _open(self) -> None:
        if self._opened.is_set():
            return
        try:
            self._client = open_client(self.uri, self._created_file)
        except BaseException as exc:  # noqa: BLE001  re-raised where the client is needed
            self._open_error = exc
        finally:
            self._opened.set()

    def discard(self) -> None:
        """Give up before anything was written (the sweep could not start): stop the writer and
        remove the SQLite file opening the store created, so a refused sweep leaves no store."""
        self._queue.stop()
        if self._created_file and not self._queue.records and os.path.exists(self._created_file):
            self._client = None
            os.remove(self._created_file)

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

    # -- declaring runs -------------------------------------------------------------------------
    def declare(self, key: str, name: str, role: str, parent: str | None = None, **tags: str) -> None:
        """Declare the run `key` (created, or found again, on first write)."""
        self._runs.declare(key, name, role, parent, tags)

    def run_id(self, key: str) -> str | None:
        """The MLflow run id of `key` if it has been created (None while the server is away)."""
        return self._runs.run_id(key)

    # -- writes ---------------------------------------------------------------------------------
    def log_params(self, key: str, params: dict[str, Any]) -> None:
        self._queue.submit(Record("params", key, {k: _param_text(v) for k, v in params.items()}))

    def log_metrics(self, key: str, metrics: dict[str, Any], step: int) -> None:
        """Log the finite numeric values of `metrics` at `step` (a step already logged is skipped)."""
        clean = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if clean:
            self._queue.submit(Record("metrics", key, clean, step=int(step)))

    def set_tags(self, key: str, tags: dict[str, Any]) -> None:
        self._queue.submit(Record("tags", key, {k: str(v) for k, v in tags.items()}))

    def set_status(self, key: str, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown trial status {status!r}; expected one of {STATUSES}")
        if status in MLFLOW_STATUS:
            self._ended.add(key)
        else:
            self._ended.discard(key)
        self._queue.submit(Record("status", key, status))

    def log_artifacts(self, key: str, folder: str | os.PathLike) -> None:
        self._queue.submit(Record("artifacts", key, str(folder)))

    def log_dataset(self, key: str, name: str, digest: str, source: str, profile: dict[str, Any]) -> None:
        """An MLflow dataset input of run `key` (what the UI's Datasets column shows)."""
        self._queue.submit(
            Record(
                "dataset",
                key,
                {
                    "name": name,
                    "digest": digest,
                    "source_type": "samtune",
                    "source": source,
                    "profile": json.dumps(profile),
                },
            )
        )

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
        return self._runs.retire_unknown_trials(cell_key, known)

    def end_open_runs(self) -> None:
        """Mark KILLED every run created here that got no final status (the sweep was
        interrupted), so none stays RUNNING in the UI; a resumed sweep reopens them."""
        with self._queue.lock:
            queued = {record.key for record in self._queue.records}
        for key, spec in list(self._runs.specs.items()):
            if key not in self._ended and (spec.run_id is not None or key in queued):
                self._queue.submit(Record("end", key, "KILLED"))

    def flush(self) -> bool:
        """Try to write everything queued, from this thread; True when nothing is left."""
        return self._queue.drain()

    def close(self, wait_s: float = 0.0) -> str | None:
        """Stop the writer thread and flush a last time, retrying for up to `wait_s` seconds what
        the store does not take at once (said in one line when it waits). Returns a message
        naming what could not be written, or None."""
        self._queue.stop()
        rejected = f"{self.rejected} record(s) MLflow refused are in {self.rejected_path}" if self.rejected else None
        if self._open_error is not None:
            with self._queue.lock:
                if self._queue.records:
                    self._spool.write(self._queue.records)
            return (
                f"MLflow at {self.shown_uri} could not be opened ({failure_text(self._open_error)}): "
                f"{self.pending} record(s) were not logged; they are saved in {self.spool_path}"
            )
        if self._queue.drain_within(wait_s, self._waiting):
            return rejected
        replay = f"; `{self.replay_hint}` writes them" if self.replay_hint else ""
        return (
            f"MLflow at {self.shown_uri} could not be reached: {self.pending} record(s) were not "
            f"logged; they are saved in {self.spool_path}{replay}" + (f"; {rejected}" if rejected else "")
        )

    def _waiting(self, seconds: float, why: str) -> None:
        log.warning(
            "MLflow at %s is not taking the last %d record(s) (%s); retrying for up to %.0f s",
            self.shown_uri,
            self.pending,
            why,
            seconds,
        )

    @property
    def pending(self) -> int:
        return len(self._queue.records)


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]  # MLflow's limit on a param value

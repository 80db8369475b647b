"""Recording a sweep's trials as they run: Tune's trial events, forwarded by `SweepCallback` to
the `Recorder` of the trial's cell, become MLflow runs and metrics (`samtune.sweep.tracking`) and
the rows of the live view. Also what a resumed driver needs to pick the records up again: the
sweep's ``sweep.json`` (`write_state`) and the records of trials that ended while no driver was
listening (`reconcile`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from samtune.contract.messages import masked
from samtune.contract.metrics import METRICS, SHARPNESS_SKIPPED_NOTE, is_sharpness_setting, sharpness_params
from samtune.contract.tags import (
    CELL_TAG,
    ERROR_TAG,
    PLACEMENT_TAG,
    SEARCH_TAG,
    SHARPNESS_SKIPPED_TAG,
    SPACE_FILE_TAG,
    STATUS_TAG,
    SWEEP_ID_TAG,
    TRIAL_KEY_TAG,
)
from samtune.sweep.check import space_fingerprint
from samtune.sweep.plan import TUNE_DIR, Plan, jsonable, shown_path
from samtune.sweep.progress import StageProgress
from samtune.sweep.recovery import settle_failed_trials
from samtune.sweep.results import CellResult, TrialRow, finite
from samtune.sweep.run_names import sweep_run_name, trial_run_name
from samtune.sweep.search import cell_index
from samtune.sweep.study import Cell, Sweep
from samtune.sweep.tracking import Tracker

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)


class Recorder:
    """Driver-side bookkeeping of one cell: MLflow records and the live view's rows."""

    def __init__(
        self,
        sweep: Sweep,
        cell: Cell,
        tracker: Tracker,
        sweep_key: str,
        on_change: Callable[[], None] | None = None,
        on_done: Callable[[], None] | None = None,
        result: CellResult | None = None,
        searched: Collection[str] | None = None,
    ):
        """`on_change`: after every event; `on_done`: once, when the cell's whole budget ended.
        `result`: the cell's rows so far (a later stage of the sweep adds to them); given, the
        cell's run exists already and is not declared again. `searched`: the settings the space
        suggests, which trial run names show (`samtune.sweep.run_names`)."""
        self.sweep, self.cell, self.tracker = sweep, cell, tracker
        self.cell_key = f"{sweep_key}/{cell.slug}"
        self.on_change = on_change or (lambda: None)
        self.on_done = on_done or (lambda: None)
        self.budget: float = sweep.trials  # trials whose end ends the cell
        self.searched = searched
        self.ended = 0
        self.done = False
        #: The stage this recorder's runs belong to, for the view's done/total and time left.
        self.progress: StageProgress | None = None
        self._placements: dict[str, str] = {}
        # The sharpness settings each trial's run has as params (logged once, not every epoch).
        self._settings: dict[str, dict[str, str]] = {}
        self.result = result if result is not None else CellResult(cell)
        if result is not None:
            return
        tracker.declare(self.cell_key, cell.label, "cell", parent=sweep_key, **{CELL_TAG: cell.label})
        tracker.log_params(
            self.cell_key,
            {
                "scenario": sweep.scenario,
                "label_noise_rate": cell.label_noise_rate,
                "label_noise_kind": cell.label_noise_kind,
            },
        )

    def _key(self, trial: Trial) -> str:
        return f"{self.cell_key}/{trial.trial_id}"

    def _row(self, trial: Trial) -> TrialRow:
        row = self.result.trials.get(trial.trial_id)
        if row is None:
            params = {k: v for k, v in trial.config.items() if k not in self._cell_keys}
            row = self.result.trials[trial.trial_id] = TrialRow(
                trial.trial_id,
                params,
                number=trial.config.get("trial_number"),
                baseline=bool(trial.config.get("baseline")),
            )
        return row

    @property
    def _cell_keys(self) -> set[str]:
        # What every trial of the cell shares, and the baseline mark: not settings worth a column.
        return set(self.sweep.base_config(self.cell)) - set(self.sweep.fixed) | {"baseline", "trial_number"}

    def trial_start(self, trial: Trial) -> None:
        key = self._key(trial)
        self.tracker.declare(
            key,
            trial_run_name(self.sweep, self.cell, trial.config, self.searched),
            "trial",
            parent=self.cell_key,
            **{CELL_TAG: self.cell.label, TRIAL_KEY_TAG: key, STATUS_TAG: "running"},
        )
        self.tracker.log_params(key, trial.config)
        self._row(trial).status = "running"
        self.on_change()

    def trial_result(self, trial: Trial, result: dict[str, Any]) -> None:
        row = self._row(trial)
        # Only finite numbers count: a diverged epoch's NaN, or the gaps of a progress table read
        # back on resume, are neither logged nor shown.
        metrics = {k: v for k, v in result.items() if (k in METRICS or k.startswith("sharpness/")) and finite(v)}
        epoch = int(metrics.get("epoch", result.get("training_iteration", 0)))
        self._log_settings(trial, sharpness_params(metrics))
        series = {k: v for k, v in metrics.items() if not is_sharpness_setting(k)}
        self.tracker.log_metrics(self._key(trial), series, step=epoch)
        skipped = result.get(SHARPNESS_SKIPPED_NOTE)
        if isinstance(skipped, str):  # text: a tag, not a metric
            self.tracker.set_tags(self._key(trial), {SHARPNESS_SKIPPED_TAG: skipped[:5000]})
        placement = result.get("placement")
        if isinstance(placement, str) and self._placements.get(trial.trial_id) != placement:
            # Where the workers ran (a restarted trial may run elsewhere: the tag holds the latest).
            self._placements[trial.trial_id] = placement
            self.tracker.set_tags(self._key(trial), {PLACEMENT_TAG: placement})
        if epoch > row.epoch and self.progress is not None:
            self.progress.epoch_done()
        row.epoch = max(row.epoch, epoch)
        row.metrics.update(metrics)
        if finite(metrics.get("val_error")) and metrics["val_error"] < row.best_epoch.get("val_error", math.inf):
            row.best_epoch = dict(metrics)
        if metrics.get("diverged"):
            row.status = "diverged"
        self.on_change()

    def _log_settings(self, trial: Trial, settings: dict[str, str]) -> None:
        """The sharpness settings a result reports, as params of the trial's run: fixed for the
        trial, so one param each (a metric series of one repeated value would be the UI's first
        charts), written when first seen."""
        logged = self._settings.setdefault(trial.trial_id, {})
        new = {k: v for k, v in settings.items() if k not in logged}
        if new:
            self.tracker.log_params(self._key(trial), new)
            logged.update(new)

    def seen_ending(self, trial_id: str) -> bool:
        row = self.result.trials.get(trial_id)
        return row is not None and row.status in ("finished", "stopped", "diverged", "failed")

    def trial_end(self, trial: Trial, failed: bool) -> None:
        row = self._row(trial)
        last = getattr(trial, "last_result", None) or {}
        if not failed and finite(last.get("epoch")) and last["epoch"] > row.epoch:
            # Restored from the checkpoint of its last epoch (the driver was killed between that
            # epoch's report and Tune's save), it ends without reporting again: its last result,
            # which Tune kept, is what it came to (its status, and whether it is a pick).
            self.trial_result(trial, last)
        if failed:
            status = "failed"
            row.error = trial_error(trial)
            if row.error and getattr(trial, "error_file", None):
                row.error += f" (traceback: {shown_path(trial.error_file)})"
            if row.error:
                self.tracker.set_tags(self._key(trial), {ERROR_TAG: row.error[:5000]})
        elif row.metrics.get("diverged"):
            status = "diverged"
        elif row.epoch < self.sweep.epochs:
            status = "stopped"
        else:
            status = "finished"
        row.status = status
        # Its weights, should it be one of its cell's picks (`samtune.sweep.pick_models`).
        row.checkpoint = getattr(trial, "checkpoint", None) or row.checkpoint
        self.tracker.set_status(self._key(trial), status)
        self.ended += 1
        if self.progress is not None:
            self.progress.run_ended(epochs_left=self.sweep.epochs - row.epoch)
        self.on_change()
        if not self.done and self.ended >= self.budget:
            # The cell's budget has ended while the sweep's next cells may still be running.
            self.done = True
            self.tracker.set_status(self.cell_key, "finished")
            self.on_done()


def trial_error(trial: Trial) -> str:
    """The last line of the error a failed Tune trial left (its exception, type and message)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = Path(path).read_text(errors="replace").splitlines() if path else []
    except OSError:
        return ""
    # Tune writes each failure's traceback; the exception is its last unindented line.
    return next(
        (
            line.strip()
            for line in reversed(lines)
            if line.strip() and not line[0].isspace() and not line.startswith("Failure #")
        ),
        "",
    )


# The recorders of this driver process, by cell folder name, while its Tuner runs (`recording_to`).
# A table in the process, not a field of the callback, because of --resume: Tune pickles its
# callbacks with the experiment (``tuner.pkl``) and `Tuner.restore` calls the copies it unpickles
# from there; Ray's API takes no new callbacks on restore, so the driver never holds the
# `SweepCallback` a resumed Tuner calls and cannot hand it its recorders. The copy finds them
# here instead, by the cell folder names it was built with.
_LIVE_RECORDERS: dict[str, Recorder] = {}


@contextmanager
def recording_to(recorders: dict[str, Recorder]) -> Iterator[None]:
    """For the length of the block, every `SweepCallback` of this process reports to
    `recorders` (by cell slug), a resumed Tuner's unpickled one included."""
    _LIVE_RECORDERS.update(recorders)
    try:
        yield
    finally:
        for slug in recorders:
            _LIVE_RECORDERS.pop(slug, None)


class SweepCallback(Callback):
    """Forwards Tune's trial events to this driver's `Recorder` of the trial's cell, found by the
    cell's folder name in the recorders `recording_to` made live: the pickled copy Tune keeps for
    ``--resume`` holds no live state."""

    def __init__(self, cells: list[Cell], stage: str = ""):
        """`stage`: the prefix of the recorders' names in `recording_to` ("" for the search,
        "confirm:" for the confirmation stage's Tuner)."""
        self.rates = tuple((c.label_noise_kind, c.label_noise_rate) for c in cells)
        self.slugs = tuple(c.slug for c in cells)
        self.stage = stage

    def _recorder(self, trial: Trial) -> Recorder | None:
        index = cell_index(self.rates, trial.config)
        # A callback pickled before stages existed has no `stage`: it is the search's.
        return None if index is None else _LIVE_RECORDERS.get(getattr(self, "stage", "") + self.slugs[index])

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if (r := self._recorder(trial)) is not None:
            r.trial_start(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        if (r := self._recorder(trial)) is not None:
            r.trial_result(trial, result)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if (r := self._recorder(trial)) is not None:
            r.trial_end(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if (r := self._recorder(trial)) is not None:
            r.trial_end(trial, failed=True)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if (r := self._recorder(trial)) is not None:
            log.warning(
                "%s trial %s failed and restarts from its last checkpoint: %s",
                r.cell.label,
                trial.trial_id,
                trial_error(trial) or "(no error recorded)",
            )


class TrialFailureFilter(logging.Filter):
    """Drops Tune's own reports of a failed trial (a traceback each, and a closing list): the
    sweep says in one line why a trial failed, or that it restarts, and the full traceback stays
    in the trial's ``error.txt``."""

    LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trial task failed", "Trials did not complete"))

    def install(self) -> TrialFailureFilter:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def write_state(plan: Plan) -> None:
    """Write ``sweep.json`` (what --resume checks and continues) unless it exists; atomically, so
    a driver killed mid-write leaves no half file that --resume could not read."""
    state_file = plan.sweep_dir / "sweep.json"
    if state_file.exists():
        return
    state = {
        "sweep": jsonable(plan.sweep.to_dict()),
        "space_file": plan.space_path,
        "space": space_fingerprint(plan.sweep, plan.space),
        # Without its secrets: --resume asks for them again (`resolve_tracking_uri` takes them
        # from MLFLOW_TRACKING_URI), and MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD keep them
        # out of the URI altogether.
        "tracking_uri": masked(plan.tracking_uri),
        "sweep_id": plan.sweep_id,
        "optuna_storage": plan.optuna_storage,
        "started": time.time(),
    }
    # Its own user only: the folder holds pickles (Tune's state, the samplers') that a resume loads.
    plan.sweep_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = state_file.with_name(f".sweep.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_file)


def search_label(sweep: Sweep) -> str:
    """How a sweep searches, in words: what its run is labelled with and its header says."""
    if sweep.deterministic:
        return (
            f"deterministic: trials suggested and stopped in batches of {sweep.search_batch} per cell, "
            "from results alone"
        )
    return "asynchronous: suggestions and early stops depend on the order results arrive in"


def declare_sweep(plan: Plan, tracker: Tracker) -> str:
    """Declare the sweep's MLflow run (with its settings as params); returns its key."""
    sweep = plan.sweep
    tracker.declare(
        plan.sweep_key,
        sweep_run_name(sweep.name, plan.sweep_id),
        "sweep",
        **{SPACE_FILE_TAG: plan.space_path, SWEEP_ID_TAG: plan.sweep_id, SEARCH_TAG: search_label(sweep)},
    )
    tracker.log_params(
        plan.sweep_key,
        {k: v for k, v in sweep.to_dict().items() if k != "fixed"} | {f"fixed.{k}": v for k, v in sweep.fixed.items()},
    )
    return plan.sweep_key


def reconcile(plan: Plan, recorders: Mapping[str, Recorder], folder: str = TUNE_DIR) -> dict[str, int]:
    """Bring each cell's records up to Tune's saved state (of the search, or of the Tuner in
    ``folder``); return how many trials of each cell (by slug) have ended.

    A trial that ended while an earlier driver ran (the sweep is resumed) produces no callback in
    this one: its row is rebuilt from Tune's per-trial progress table, and its MLflow run is found
    by its trial key and completed. Steps already in MLflow are skipped, so an earlier driver
    killed between a trial's result and its MLflow write leaves no gap and no duplicate.
    """
    from ray.tune import ExperimentAnalysis

    ended = {slug: 0 for slug in recorders}
    failed = {
        trial_id for r in recorders.values() for trial_id, row in r.result.trials.items() if row.status == "failed"
    }
    local = plan.tune_copy(folder)
    if settled := settle_failed_trials(local, failed):
        plan.tune_state_changed(folder, settled)
    try:
        analysis = ExperimentAnalysis(str(local))
    except Exception:  # noqa: BLE001  no state written: nothing ended
        return ended
    cells = plan.sweep.cells()
    rates = [(c.label_noise_kind, c.label_noise_rate) for c in cells]
    known: dict[str, set[str]] = {slug: set() for slug in recorders}
    frames = None
    for trial in analysis.trials:
        index = cell_index(rates, trial.config)
        if index is None:
            continue
        slug = cells[index].slug
        known[slug].add(trial.trial_id)
        if trial.status not in ("TERMINATED", "ERROR"):
            continue
        ended[slug] += 1
        recorder = recorders[slug]
        if recorder.seen_ending(trial.trial_id):
            continue
        if frames is None:
            frames = analysis.trial_dataframes
        recorder.trial_start(trial)
        frame = frames.get(trial.trial_id)
        for result in ([] if frame is None else frame.to_dict("records")) or [trial.last_result or {}]:
            recorder.trial_result(trial, result)
        recorder.trial_end(trial, failed=trial.status == "ERROR")
    for slug, recorder in recorders.items():
        if folder == TUNE_DIR and plan.resume and ended[slug] >= plan.sweep.trials:
            lost = recorder.tracker.retire_unknown_trials(recorder.cell_key, known[slug])
            for key in lost:
                log.warning(
                    "trial %s was started by the killed driver before Tune saved it; Tune ran "
                    "another trial in its place, and its MLflow run is tagged samtune.role=lost",
                    key,
                )
    return ended

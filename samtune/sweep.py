"""Running a sweep: a Ray Tune study (Optuna TPE + ASHA) of `train.run_trial` per scenario cell.

Every cell of the `Sweep` (e.g. label noise 0.0, 0.2, ... 0.8) has its own `OptunaSearch` (TPE,
seeded per cell) over the space file's `space(trial)`, and its own `ASHAScheduler` stopping
hopeless trials on the per-epoch metric. SGD and SAM trials share a cell's study, so each cell has
its own baseline. All cells run under one `Tuner` (`CellSearch` deals trials out cell after cell,
`CellScheduler` keeps each cell's ASHA apart), so trial processes serve every cell. The driver
writes every trial to MLflow (`samtune.tracking`) and shows a live view; Ray's own tables are
turned off.

On disk, under ``<storage_path>/<sweep name>/``: ``sweep.json`` (what was run and the sweep id its
MLflow runs are keyed by, for ``--resume``), the Tune experiment folder ``trials/`` (trial
checkpoints, every cell's searcher state) and, if the tracking server failed, the spool of
records it did not take. ``--resume`` restores the Tuner, so finished trials are not run again and
each cell's Optuna searcher continues from its saved state.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shlex
import shutil
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .driver_lock import DriverLock, SweepBusy
from .interrupts import InterruptWatch
from .preflight import PreflightError, check_cells
from .ray_env import apply_ray_env
from .space import (Cell, SpaceError, Sweep, apply_overrides, check_space, fingerprint_changes, load_space,
                    space_fingerprint)
from .tracking import Tracker, check_tracking_uri, resolve_tracking_uri

__all__ = ["SweepError", "SweepInterrupted", "run_sweep", "prepare", "CellResult", "TrialRow"]

# What a trial reports that is worth a metric series in MLflow (Tune adds its own bookkeeping).
TRIAL_METRICS = ("epoch", "train_loss", "train_acc_noisy", "train_acc_true", "train_error",
                 "flipped_acc_noisy", "flipped_acc_true", "val_error", "val_loss", "test_error",
                 "test_loss", "generalization_gap", "epoch_time_s", "samples_per_s", "train_time_s",
                 "compute_time_s",
                 "lr", "lr_backbone", "diverged", "m_effective", "m_workers", "m_groups_per_worker",
                 "m_per_worker_batch", "nodes", "allreduce_per_step")
MIN_FREE_BYTES = 200 * 2**20
log = logging.getLogger("samtune.sweep")


class SweepError(ValueError):
    """A sweep that cannot start: bad storage, unreachable services, nothing to resume."""


class SweepInterrupted(RuntimeError):
    """The sweep was interrupted; ``samtune sweep FILE --resume`` finishes it."""


@dataclass
class TrialRow:
    """One trial as the live view and the summary see it."""

    trial_id: str
    params: dict[str, Any]
    status: str = "pending"
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # why a failed trial failed: its exception's last line

    @property
    def optimizer(self) -> str:
        return str(self.params.get("optimizer", "sgd"))


@dataclass
class CellResult:
    cell: Cell
    trials: dict[str, TrialRow] = field(default_factory=dict)

    def best(self, metric: str, mode: str, optimizer: str | tuple[str, ...] | None = None) -> TrialRow | None:
        """The best trial by `metric` (of `optimizer`, a name or several), among the trials that
        ran their whole budget; among the ones ASHA stopped only when none did. A stopped
        trial's metric is from an earlier epoch, often lower than any final value after a
        cosine schedule's warm phase, and would otherwise win on that alone."""
        sign = 1.0 if mode == "min" else -1.0
        names = (optimizer,) if isinstance(optimizer, str) else optimizer
        for status in ("finished", "stopped"):
            rows = [r for r in self.trials.values() if r.status == status
                    and finite(r.metrics.get(metric)) and (names is None or r.optimizer in names)]
            if rows:
                return min(rows, key=lambda r: sign * r.metrics[metric])
        return None


# ------------------------------------------------------------------------------ search space
class CellSpace:
    """The define-by-run function of one cell: the file's space plus the cell's fixed settings.

    Picklable (the space pickles by its file path), because Tune saves the searcher for resume.
    """

    def __init__(self, space: Callable, base: dict[str, Any]):
        self.space = space
        self.base = dict(base)

    def __call__(self, trial) -> dict[str, Any]:
        returned = self.space(trial) or {}
        # Suggested values are added by OptunaSearch itself; constants come from here.
        return {**self.base, **returned}


class AshaAwareOptunaSearch(OptunaSearch):
    """`OptunaSearch` that tells Optuna a trial ASHA stopped early is PRUNED, not COMPLETE.

    Ray's `OptunaSearch` records an early-stopped trial as COMPLETE with its early value, so TPE
    would compare a 4-epoch error with 16-epoch ones as if they were the same measurement. Told
    PRUNED, Optuna keeps the last reported value (every epoch is reported as an intermediate
    value), and TPE ranks pruned trials below every completed one, deeper ones first: the verdict
    ASHA already reached. A diverged trial ends by itself with ``val_error = 1.0`` and stays
    COMPLETE: a bad result, not a missing one. A trial that errored stays FAIL.

    Tune does not pass the result a scheduler stops a trial on to the searcher's
    ``on_trial_result``, only to ``on_trial_complete``; that epoch is reported here, so a pruned
    trial's value is the one ASHA judged it by (and a trial stopped at its first epoch has one).
    """

    def __init__(self, *args: Any, epochs: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._epochs = epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = (not error and bool(result) and trial_id in self._ot_trials
                         and trial_id not in self._completed_trials
                         and not (finite(result.get("diverged")) and result["diverged"])
                         and finite(result.get("epoch")) and result["epoch"] < self._epochs)
        if not stopped_early:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        ot_trial = self._ot_trials[trial_id]
        step = result.get("training_iteration")
        frozen = next(t for t in self._ot_study.get_trials(deepcopy=False) if t.number == ot_trial.number)
        if finite(result.get(self.metric)) and isinstance(step, int) and step not in frozen.intermediate_values:
            ot_trial.report(result[self.metric], step)
        self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def cell_index(rates: tuple[float, ...] | list[float], config: dict[str, Any]) -> int | None:
    """The cell a trial config belongs to: the index of its label-noise rate (unique per sweep)."""
    rate = config.get("label_noise_rate")
    if not finite(rate):
        return None
    for index, other in enumerate(rates):
        if math.isclose(other, rate, abs_tol=1e-12):
            return index
    return None


class CellSearch(Searcher):
    """The cells' Optuna studies behind the one searcher of a sweep's Tuner.

    Each cell keeps its own seeded TPE study (so its own SGD baseline, and its own verdicts on
    what works at its noise rate); this only deals trials out, cell after cell, each its budget.
    All cells running under one Tuner is what makes a sweep of several cells cheap: a trial
    process that served one cell serves the next (Tune reuses it, torch already imported), and
    once a cell's last trial has started a freed slot starts the next cell's first trial instead
    of idling until that trial ends. A Tuner per cell paid both at every cell.
    """

    def __init__(self, searchers: list[Searcher], trials: int, metric: str, mode: str, baselines: int = 0):
        """`baselines`: how many of each cell's first trials are its baselines (its searcher's
        points to evaluate, one per optimizer); their configs carry ``baseline=True``."""
        super().__init__(metric=metric, mode=mode)
        self.searchers = list(searchers)
        self.trials = trials
        self.baselines = baselines
        self.cell_of: dict[str, int] = {}   # Tune trial id -> cell index

    def suggest(self, trial_id: str) -> dict | str | None:
        issued = Counter(self.cell_of.values())
        for index, searcher in enumerate(self.searchers):
            if issued[index] < self.trials:
                config = searcher.suggest(trial_id)
                if isinstance(config, dict):
                    self.cell_of[trial_id] = index
                    config = {**config, "baseline": issued[index] < self.baselines}
                return config
        return Searcher.FINISHED

    def _owner(self, trial_id: str) -> Searcher | None:
        index = self.cell_of.get(trial_id)
        return None if index is None else self.searchers[index]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if (searcher := self._owner(trial_id)) is not None:
            searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if (searcher := self._owner(trial_id)) is not None:
            searcher.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__.copy(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))  # noqa: S301  written by this sweep's own driver


class CellScheduler(FIFOScheduler):
    """One ASHA per cell behind a sweep's one Tuner: a trial is judged only against the trials of
    its own cell, whose errors share its noise rate. Trials start in the order they were added.

    A cell's baseline trials (``baseline=True``: its first SGD and first SAM trial) are never
    stopped. Their results still set the cell's rungs, but a comparison of SAM with SGD needs
    both at full length, and asynchronous ASHA judges a trial by whoever reached its rung
    first: under label noise SGD's early epochs look good, then it memorizes the flipped labels,
    so a SAM baseline reaching epoch 4 after a few SGD trials could be stopped on errors SGD
    never keeps.
    """

    def __init__(self, rates: tuple[float, ...], schedulers: list, max_t: int):
        super().__init__()
        self.rates = tuple(rates)
        self.schedulers = list(schedulers)
        self.max_t = max_t

    def _of(self, trial):
        index = cell_index(self.rates, trial.config)
        if index is None:
            raise ValueError(f"trial {trial.trial_id} belongs to no cell of this sweep "
                             f"(label_noise_rate={trial.config.get('label_noise_rate')!r})")
        return self.schedulers[index]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric, mode
        return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers])

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = self._of(trial).on_trial_result(tune_controller, trial, result)
        if action == self.STOP and trial.config.get("baseline") and result.get("epoch", 0) < self.max_t:
            return self.CONTINUE  # recorded at its rung above, but a baseline runs its budget
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(s.debug_string() for s in self.schedulers)


# ------------------------------------------------------------------------------ recording
# The recorder a Tuner's callback talks to, by cell folder. Tune pickles its callbacks with the
# experiment; a restored callback finds the live recorder of this driver process here.
_ACTIVE: dict[str, "Recorder"] = {}


class Recorder:
    """Driver-side bookkeeping of one cell: MLflow records and the live view's rows."""

    def __init__(self, sweep: Sweep, cell: Cell, tracker: Tracker, sweep_key: str,
                 on_change: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None):
        """`on_change`: after every event; `on_done`: once, when the cell's whole budget ended."""
        self.sweep, self.cell, self.tracker = sweep, cell, tracker
        self.cell_key = f"{sweep_key}/{cell.slug}"
        self.result = CellResult(cell)
        self.on_change = on_change or (lambda: None)
        self.on_done = on_done or (lambda: None)
        self.ended = 0
        self.done = False
        self._placements: dict[str, str] = {}
        tracker.declare(self.cell_key, cell.label, "cell", parent=sweep_key,
                        **{"samtune.cell": cell.label})
        tracker.log_params(self.cell_key, {"scenario": sweep.scenario, "label_noise_rate": cell.label_noise_rate,
                                           "label_noise_kind": sweep.label_noise_kind})

    def _key(self, trial) -> str:
        return f"{self.cell_key}/{trial.trial_id}"

    def _row(self, trial) -> TrialRow:
        row = self.result.trials.get(trial.trial_id)
        if row is None:
            params = {k: v for k, v in trial.config.items() if k not in self._cell_keys}
            row = self.result.trials[trial.trial_id] = TrialRow(trial.trial_id, params)
        return row

    @property
    def _cell_keys(self) -> set[str]:
        # What every trial of the cell shares, and the baseline mark: not settings worth a column.
        return set(self.sweep.base_config(self.cell)) - set(self.sweep.fixed) | {"baseline"}

    def trial_start(self, trial) -> None:
        key = self._key(trial)
        self.tracker.declare(key, f"{self.cell.label} {trial.trial_id}", "trial", parent=self.cell_key,
                             **{"samtune.cell": self.cell.label, "samtune.trial_key": key,
                                "samtune.status": "running"})
        self.tracker.log_params(key, trial.config)
        self._row(trial).status = "running"
        self.on_change()

    def trial_result(self, trial, result: dict[str, Any]) -> None:
        row = self._row(trial)
        # Only finite numbers count: a diverged epoch's NaN, or the gaps of a progress table read
        # back on resume, are neither logged nor shown.
        metrics = {k: v for k, v in result.items()
                   if (k in TRIAL_METRICS or k.startswith("sharpness/")) and finite(v)}
        epoch = int(metrics.get("epoch", result.get("training_iteration", 0)))
        self.tracker.log_metrics(self._key(trial), metrics, step=epoch)
        placement = result.get("placement")
        if isinstance(placement, str) and self._placements.get(trial.trial_id) != placement:
            # Where the workers ran (a restarted trial may run elsewhere: the tag holds the latest).
            self._placements[trial.trial_id] = placement
            self.tracker.set_tags(self._key(trial), {"samtune.placement": placement})
        row.epoch = max(row.epoch, epoch)
        row.metrics.update(metrics)
        if metrics.get("diverged"):
            row.status = "diverged"
        self.on_change()

    def seen_ending(self, trial_id: str) -> bool:
        row = self.result.trials.get(trial_id)
        return row is not None and row.status in ("finished", "stopped", "diverged", "failed")

    def trial_end(self, trial, failed: bool) -> None:
        row = self._row(trial)
        if failed:
            status = "failed"
            row.error = trial_error(trial)
            if row.error and getattr(trial, "error_file", None):
                row.error += f" (traceback: {_shown(trial.error_file)})"
            if row.error:
                self.tracker.set_tags(self._key(trial), {"samtune.error": row.error[:5000]})
        elif row.metrics.get("diverged"):
            status = "diverged"
        elif row.epoch < self.sweep.epochs:
            status = "stopped"
        else:
            status = "finished"
        row.status = status
        self.tracker.set_status(self._key(trial), status)
        self.ended += 1
        self.on_change()
        if not self.done and self.ended >= self.sweep.trials:
            # The cell's budget has ended while the sweep's next cells may still be running.
            self.done = True
            self.tracker.set_status(self.cell_key, "finished")
            self.on_done()


def trial_error(trial) -> str:
    """The last line of the error a failed Tune trial left (its exception, type and message)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = Path(path).read_text(errors="replace").splitlines() if path else []
    except OSError:
        return ""
    # Tune writes each failure's traceback; the exception is its last unindented line.
    return next((line.strip() for line in reversed(lines) if line.strip() and not line[0].isspace()
                 and not line.startswith("Failure #")), "")


class SweepCallback(Callback):
    """Forwards Tune's trial events to this driver's `Recorder` of the trial's cell (found by
    the cell's folder name, so the pickled copy Tune keeps for ``--resume`` holds no live state)."""

    def __init__(self, cells: list[Cell]):
        self.rates = tuple(c.label_noise_rate for c in cells)
        self.slugs = tuple(c.slug for c in cells)

    def _recorder(self, trial) -> "Recorder | None":
        index = cell_index(self.rates, trial.config)
        return None if index is None else _ACTIVE.get(self.slugs[index])

    def on_trial_start(self, iteration, trials, trial, **info):
        if (r := self._recorder(trial)) is not None:
            r.trial_start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (r := self._recorder(trial)) is not None:
            r.trial_result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (r := self._recorder(trial)) is not None:
            r.trial_end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        if (r := self._recorder(trial)) is not None:
            r.trial_end(trial, failed=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if (r := self._recorder(trial)) is not None:
            log.warning("%s trial %s failed and restarts from its last checkpoint: %s",
                        r.cell.label, trial.trial_id, trial_error(trial) or "(no error recorded)")


class TrialFailureFilter(logging.Filter):
    """Drops Tune's own reports of a failed trial (a traceback each, and a closing list): the
    sweep says in one line why a trial failed, or that it restarts, and the full traceback stays
    in the trial's ``error.txt``."""

    LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trial task failed", "Trials did not complete"))

    def install(self) -> "TrialFailureFilter":
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def resumable(folder: Path) -> bool:
    """Whether Tune can pick the sweep's trials up where they stopped: its Tuner and a whole
    experiment state in `folder`.

    A driver killed just as the Tuner started leaves the Tuner (``tuner.pkl``) but no experiment
    state; Tune then refuses to restore, and since no trial was recorded, the trials start afresh
    instead. A driver killed while Tune was writing its state (Tune writes it in place, at every
    step) leaves it cut short: it is put back from the copy `StateBackup` took before that step
    (see there), or, with no copy, the trials start afresh.
    """
    from ray import tune

    if not tune.Tuner.can_restore(str(folder)):
        return False
    states = sorted(folder.glob("experiment_state-*.json"))  # Tune's own order: by session time
    if not states:
        return False
    newest = states[-1]
    if _whole_json(newest):
        return True
    backup = folder / STATE_BACKUP
    if backup.exists() and _whole_json(backup):
        log.warning("Tune's experiment state %s was cut short when the driver was killed; it is put "
                    "back from the copy taken one step earlier", newest)
        tmp = newest.with_name(f".{newest.name}.tmp")
        shutil.copyfile(backup, tmp)
        os.replace(tmp, newest)
        return True
    newest.unlink()  # cut short in the first step of the first session: nothing to resume
    return False


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


STATE_BACKUP = "samtune-experiment-state.backup.json"


class StateBackup(Callback):
    """Copies Tune's experiment state aside at the start of each step of its loop.

    Tune writes the state in place at the end of every step, then the searcher's state (that
    one atomically). A driver killed in the middle of the first write leaves an empty or cut
    JSON file that Tune cannot restore. The copy taken at the start of that step is the state
    the step began from, and the searcher's state on disk is from the same moment, since the
    killed step never reached it. Its latest checkpoints still exist: `CheckpointPruner`
    keeps the one before the newest.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def on_step_begin(self, iteration, trials, **info):
        folder = Path(self.folder)
        states = list(folder.glob("experiment_state-*.json"))
        if not states:
            return
        newest = max(states)
        tmp = folder / f".{STATE_BACKUP}.tmp"
        try:
            shutil.copyfile(newest, tmp)
            os.replace(tmp, folder / STATE_BACKUP)
        except OSError:  # a backup is a precaution: never a reason to stop a sweep
            pass


class CheckpointPruner(Callback):
    """Keeps a trial's two newest checkpoints, on disk and in Tune's experiment state.

    Tune's experiment state names each trial's checkpoints and its latest one. Left to Tune
    (`num_to_keep=1`), a checkpoint is deleted as soon as the next one is registered, before the
    state that names the new one is written: a driver killed in between leaves a state naming a
    deleted checkpoint, and the resumed trial fails to restore (seen under SIGKILL). With
    `num_to_keep=2`, a resumed Tune fails instead on deleting a checkpoint its state still
    lists. Tune therefore keeps them all (`num_to_keep=None`) and writes its state at every step
    of its loop (`EXPERIMENT_STATE_PERIOD_S` = 0), one result a step; and this, as checkpoint N+1
    arrives (before Tune registers it), deletes everything older than N and drops it from the
    trial's list, so the state on disk, whose latest is N, never names a deleted one as latest.
    Dropping them from the list matters as much: Tune pickles every listed checkpoint into the
    state at every step, which grew with the epochs (75 kB a trial after 16 epochs, about 0.6 MB
    after 200, rewritten at every step for every trial).
    """

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        fs = getattr(checkpoint, "filesystem", None)
        if fs is not None and getattr(fs, "type_name", "local") != "local":
            return  # remote storage: left to its own lifecycle rules
        manager = getattr(getattr(trial, "run_metadata", None), "checkpoint_manager", None)
        listed = getattr(manager, "_checkpoint_results", None)
        if not isinstance(listed, list):
            return  # a Tune whose bookkeeping differs: keep everything rather than guess
        newest = Path(checkpoint.path)
        for old in listed[:-1]:
            path = Path(old.checkpoint.path)
            if path != newest:
                shutil.rmtree(path, ignore_errors=True)  # housekeeping: never a reason to stop
        del listed[:-1]


# How often Tune writes its experiment state: every step of its loop, so that a resumed driver
# knows every trial and checkpoint the killed one had (see CheckpointPruner: it keeps the state
# small enough for that).
EXPERIMENT_STATE_PERIOD_S = 0


# ------------------------------------------------------------------------------ preparing
@dataclass
class Plan:
    """Everything decided before the first trial: the sweep, where it lives, what it may use."""

    sweep: Sweep
    space: Any
    space_path: str
    sweep_dir: Path
    tracking_uri: str
    address: str | None
    resume: bool
    # Made when the sweep starts, kept in sweep.json: part of every MLflow run key, so a new sweep
    # of the same name starts new runs while --resume continues its own.
    sweep_id: str = ""
    # The flags that made this sweep what it is (--set, --trials, --data-root, --storage-path,
    # --address): --resume must be given them again, so the command it prints repeats them.
    flags: tuple[str, ...] = ()
    # This driver's hold on the sweep (`driver_lock`), for as long as the plan lives.
    lock: Any = field(default=None, repr=False, compare=False)

    @property
    def sweep_key(self) -> str:
        return f"{self.sweep.name}@{self.sweep_id}" if self.sweep_id else self.sweep.name

    @property
    def resume_command(self) -> str:
        """The command that finishes this sweep, ready to paste."""
        return " ".join(["samtune", "sweep", shlex.quote(_shown(self.space_path)),
                         *(shlex.quote(f) for f in self.flags), "--resume"])


def prepare(path: str, overrides: list[str] = (), *, trials: int | None = None,
            data_root: str | None = None, tracking_uri: str | None = None, address: str | None = None,
            storage_path: str | None = None, resume: bool = False) -> Plan:
    """Load and check everything a sweep needs, creating nothing in MLflow or Ray.

    Raises `SpaceError` for a bad space file or override and `SweepError` for unusable storage,
    an unreachable tracking server or cluster address, or ``--resume`` with nothing to resume.
    """
    sweep, space = load_space(path)
    sets = list(overrides)
    if trials is not None:
        sets.append(f"trials={trials}")
    if data_root is not None:
        if not os.path.exists(data_root):
            raise SweepError(f"--data-root {data_root}: no such folder or file")
        sets.append(f"fixed.data_root={os.path.abspath(data_root)}")
    sweep = apply_overrides(sweep, sets)
    sampled = check_space(sweep, space, with_constants=True)
    _check_data(sweep)
    try:
        check_cells(sweep, sampled)
    except PreflightError as exc:
        raise SweepError(str(exc)) from None

    storage = Path(storage_path or os.environ.get("SAMTUNE_STORAGE") or "ray_results").expanduser().resolve()
    sweep_dir = storage / sweep.name
    _check_storage(storage)
    try:
        # Before the sweep's state is read: a second driver must not even look at a sweep that
        # another one is changing.
        lock = DriverLock.acquire(storage, sweep.name)
    except SweepBusy as exc:
        raise SweepError(str(exc)) from None
    except OSError as exc:
        raise SweepError(f"--storage-path {storage}: cannot hold sweep {sweep.name!r} there "
                         f"({exc.strerror or exc})") from None
    state_file = sweep_dir / "sweep.json"
    if resume:
        saved = _read_state(state_file, sweep)
        if saved["sweep"] != _jsonable(sweep.to_dict()):
            changed = sorted(k for k in saved["sweep"] if saved["sweep"][k] != _jsonable(sweep.to_dict()).get(k))
            raise SweepError(f"--resume: the sweep changed since it started ({', '.join(changed)}); "
                             f"resume it with the same file and --set values, or start a new one with --set name=...")
        if isinstance(saved.get("space"), dict):  # sweeps from before the fingerprint: unchecked
            changes = fingerprint_changes(saved["space"], space_fingerprint(sweep, space))
            if changes:
                raise SweepError(f"--resume: the search space changed since the sweep started ({'; '.join(changes)}); "
                                 f"resume it with the space as it was, or start a new sweep with --set name=...")
        tracking_uri = tracking_uri or saved.get("tracking_uri")
        # A sweep.json from before sweep ids: its runs are keyed by the name alone.
        sweep_id = str(saved.get("sweep_id") or "")
    elif state_file.exists():
        raise SweepError(f"sweep {sweep.name!r} already has results in {sweep_dir}; finish it with --resume, "
                         f"or start another with --set name=... or --storage-path")
    else:
        sweep_id = uuid.uuid4().hex[:8]
    uri = resolve_tracking_uri(tracking_uri)
    try:
        check_tracking_uri(uri)
    except (ConnectionError, ValueError) as exc:
        raise SweepError(f"--tracking-uri: {exc}") from None
    if address:
        _check_address(address)
    flags = [f for value in overrides for f in ("--set", value)]
    if trials is not None:
        flags += ["--trials", str(trials)]
    if data_root is not None:
        flags += ["--data-root", os.path.abspath(data_root)]
    if storage_path is not None:
        flags += ["--storage-path", str(storage)]
    if address:
        flags += ["--address", address]
    return Plan(sweep, space, str(Path(path).resolve()), sweep_dir, uri, address, resume, sweep_id,
                tuple(flags), lock)


def _read_state(state_file: Path, sweep: Sweep) -> dict[str, Any]:
    """The saved sweep.json for --resume; SweepError when it is missing or unreadable."""
    if not state_file.exists():
        raise SweepError(f"--resume: nothing to resume for sweep {sweep.name!r}: {state_file} does not exist "
                         f"(is --storage-path the one the sweep ran with?)")
    try:
        saved = json.loads(state_file.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("sweep"), dict):
            raise ValueError("no 'sweep' entry")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SweepError(f"--resume: {state_file} is damaged ({type(exc).__name__}: {_first_line(exc)}); "
                         f"this sweep cannot be resumed; start it again with --set name=... "
                         f"or another --storage-path") from None
    return saved


def _check_data(sweep: Sweep) -> None:
    """Load the dataset once in the driver: a missing or malformed dataset is named before any
    trial starts, and the decoded-tensor cache is built once instead of in every trial."""
    from .data import DataNotFoundError, load_dataset

    try:
        load_dataset(sweep.dataset, sweep.fixed.get("data_root"))
    except (DataNotFoundError, ValueError) as exc:
        raise SweepError(f"dataset {sweep.dataset!r}: {exc}") from None


def _check_storage(storage: Path) -> None:
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".samtune-write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise SweepError(f"--storage-path {storage}: cannot write there ({exc.strerror or exc})") from None
    free = shutil.disk_usage(storage).free
    if free < MIN_FREE_BYTES:
        raise SweepError(f"--storage-path {storage}: only {free / 2**20:.0f} MiB free; a sweep needs at least "
                         f"{MIN_FREE_BYTES / 2**20:.0f} MiB for checkpoints")


def check_shared_storage(storage: Path) -> None:
    """Refuse a storage folder that some node of the connected Ray cluster cannot reach.

    Trials write their checkpoints there and a trial restarted on another node resumes from
    them, so on a cluster of several nodes the folder must be one every node mounts. Each alive
    node is asked, by a task pinned to it, to read a file written here; raises SweepError naming
    the nodes that could not.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    probe = storage / f".samtune-shared-{token[:8]}"
    probe.write_text(token)
    try:
        blind = [f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"
                 for n, seen in zip(nodes, _read_on_every_node(nodes, str(probe), token)) if not seen]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise SweepError(f"--storage-path {storage}: {len(blind)} of the Ray cluster's {len(nodes)} nodes cannot "
                         f"reach it ({', '.join(blind)}); every node must reach the same path, so put it on a "
                         f"file system all nodes mount")


def _read_on_every_node(nodes: list[dict], path: str, token: str, timeout_s: float = 120.0) -> list[bool]:
    """Whether each node's processes read `token` from `path` (False: a node that cannot, or
    does not answer in time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_reads_token)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(path, token) for n in nodes]
    seen = []
    for ref in refs:
        try:
            seen.append(bool(ray.get(ref, timeout=timeout_s)))
        except Exception:  # noqa: BLE001  a node that cannot run the probe cannot be relied on either
            seen.append(False)
    return seen


def _reads_token(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def _check_address(address: str) -> None:
    """Fail within seconds when a Ray cluster address does not answer (ray.init would hang)."""
    if address == "auto":
        return  # ray.init("auto") fails fast by itself when there is no local cluster
    if address.startswith("ray://"):
        # Ray Client runs Tune's driver on the cluster: the callbacks that write MLflow, draw the
        # live view and rebuild finished trials from the local sweep folder would run there, not
        # here, and the sweep would record nothing.
        raise SweepError(f"--address {address}: Ray Client (ray://) is not supported, since the sweep's "
                         f"driver must run where samtune runs; run samtune on a node of that cluster with "
                         f"--address auto (and a --storage-path every node shares)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--address {address}: expected auto or host:port of a Ray cluster this machine is a node of")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise SweepError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _shown(path: str) -> str:
    """`path` relative to here when it lies below here, else absolute: short, and pasteable."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith(os.pardir) else relative


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------------------ running
def _start_ray(address: str | None) -> None:
    """Join the cluster at `address` (``auto``: the one `ray start` runs on this machine), else
    the one `RAY_ADDRESS` names (as inside a Ray job), else start a private local Ray instance,
    even when another runs here: its resources are this sweep's alone."""
    import ray

    if ray.is_initialized():
        return
    source = f"--address {address}"
    if not address and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        source = f"RAY_ADDRESS={address}"
    runtime_env = apply_ray_env()
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SweepError(f"{source}: cannot join that Ray cluster ({_first_line(exc)})") from None
    else:
        # Explicit resources: what this machine has (or the CPUs this process may use), so Ray
        # neither over- nor under-packs trials. "local" starts a new instance where a bare
        # ray.init() would join a `ray start` cluster (and refuse these resources).
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ray.init(address="local", num_cpus=cpus, num_gpus=_local_gpus(), runtime_env=runtime_env,
                 log_to_driver=False, logging_level="ERROR",
                 dashboard_host="127.0.0.1")


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001  a broken CUDA install: train on CPU
        return 0


def trial_resources(sweep: Sweep, cluster: dict[str, float]) -> tuple[dict[str, float], float, int]:
    """(Tune resources of one trial, CPUs it really takes, trials that fit at once).

    With several workers the trial's own process holds `train.trial_driver_resources` (no CPU,
    on the head node) and its Ray Train workers hold their own (`train.worker_resources`), so
    concurrency counts both. Raises SweepError when one trial can never fit the cluster.
    """
    from .train import TrialConfigError, resolve_config, trial_driver_resources, worker_resources

    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if sweep.workers == 1:
        tune_res = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
        need = sweep.cpus_per_trial
    else:
        cfg = resolve_config({**sweep.base_config(sweep.cells()[0])})
        tune_res = trial_driver_resources(cluster)
        try:
            per = worker_resources(cfg, cpus, driver_cpu=tune_res["cpu"])["CPU"]
        except TrialConfigError as exc:
            raise SweepError(str(exc)) from None
        need = tune_res["cpu"] + per * sweep.workers
    if need > cpus + 1e-9:
        raise SweepError(f"one trial needs {need:g} CPUs but the Ray cluster has {cpus:g}; "
                         f"lower cpus_per_trial or workers")
    if sweep.gpus_per_trial > gpus:
        raise SweepError(f"gpus_per_trial={sweep.gpus_per_trial:g} but the Ray cluster has {gpus:g} GPUs")
    fit = int(cpus // need + 1e-9)
    if sweep.gpus_per_trial > 0:
        fit = min(fit, int(gpus // sweep.gpus_per_trial + 1e-9))
    # The cells share one Tuner, so the whole sweep's trials can run at once.
    concurrent = max(1, min(fit, sweep.max_concurrent or fit, sweep.trials * len(sweep.cells())))
    return tune_res, need, concurrent


# The one Tune experiment folder of a sweep, under its folder: every cell's trials, checkpoints
# and searcher state.
TUNE_DIR = "trials"


def _tuner(plan: Plan, concurrent: int, resources: dict[str, float]):
    import copy

    import optuna
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from .train import run_trial

    sweep = plan.sweep
    cells = sweep.cells()
    # See CheckpointPruner. Read by the Tuner's controller, so set before it exists.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_STATE_PERIOD_S))
    trainable = tune.with_resources(run_trial, resources)
    path = plan.sweep_dir / TUNE_DIR
    # Optuna warns when a restarted trial reports an epoch again; the view has no room for that.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if plan.resume and resumable(path):
        # A trial that failed (after its own restarts) stays failed: resuming finishes what was
        # interrupted, it does not re-run what already ended.
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False)
    points = baseline_points(plan)
    searchers = [
        AshaAwareOptunaSearch(
            space=CellSpace(plan.space, sweep.base_config(cell)), metric=sweep.metric, mode=sweep.mode,
            sampler=optuna.samplers.TPESampler(seed=sweep.seed * 1009 + cell.index,
                                               n_startup_trials=max(2, min(10, sweep.trials // 3))),
            points_to_evaluate=copy.deepcopy(points), epochs=sweep.epochs)
        for cell in cells]
    scheduler = CellScheduler(
        [c.label_noise_rate for c in cells],
        [ASHAScheduler(time_attr="epoch", max_t=sweep.epochs, grace_period=sweep.asha_grace_period,
                       reduction_factor=sweep.reduction_factor) for _ in cells],
        max_t=sweep.epochs)
    search = CellSearch(searchers, sweep.trials, metric=sweep.metric, mode=sweep.mode,
                        baselines=len(points or ()))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.trials * len(cells),
                                    search_alg=ConcurrencyLimiter(search, max_concurrent=concurrent),
                                    scheduler=scheduler, max_concurrent_trials=concurrent,
                                    reuse_actors=reuse_trial_processes(sweep)),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=str(plan.sweep_dir), verbose=0,
            # Each trial's progress.csv is what a resumed driver rebuilds finished trials from.
            callbacks=[SweepCallback(cells), CSVLoggerCallback(), CheckpointPruner(), StateBackup(str(path))],
            # A crashed trial process restarts from its last checkpoint as often as the sweep allows.
            failure_config=tune.FailureConfig(max_failures=int(sweep.fixed.get("max_failures", 2))),
            # All kept by Tune; CheckpointPruner removes those no resume can need.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        ),
    )


def reuse_trial_processes(sweep: Sweep) -> bool:
    """Whether a trial process serves the next trial, of any cell.

    With one worker, yes: no new process and no torch/Ray imports per trial (seconds each on 2
    cores). With several, no: the trial's thread is still inside `TorchTrainer.fit()`, tearing
    down its worker group, when Tune asks the process to take the next trial; Tune gives that
    thread 2 s, then fails the next trial ("Could not re-use actor"). A fresh process per trial
    costs little beside starting a worker group, and the old process's end frees its workers.
    """
    return sweep.workers == 1


def baseline_points(plan: Plan) -> list[dict[str, Any]] | None:
    """First trials of every cell: one per optimizer the space offers (SGD first), the rest of
    their settings sampled, so each cell has its own SGD baseline however TPE wanders."""
    offered: list[str] = []
    for params in check_space(plan.sweep, plan.space, samples=32):
        name = params.get("optimizer")
        if isinstance(name, str) and name not in offered:
            offered.append(name)
    if len(offered) < 2 or plan.sweep.trials < len(offered):
        return None
    return [{"optimizer": name} for name in sorted(offered, key=lambda n: n != "sgd")]


def run_sweep(plan: Plan, view=None) -> list[CellResult]:
    """Run (or resume) every cell of `plan`; returns per-cell results.

    `view` (optional) gets ``start(plan, cells)``, ``update(recorder)``, ``cell_done(recorder)``
    and ``stop()`` calls. Raises `SweepInterrupted` when Tune was interrupted (Ctrl-C) before a
    cell finished; the sweep then resumes with ``--resume``.
    """
    import ray

    sweep = plan.sweep
    # The store opens in the tracker's thread while Ray starts (each takes seconds). A cluster
    # that cannot be joined, a trial that can never fit it or a store MLflow cannot open leaves
    # nothing behind that a later run would mistake for a sweep to resume, not even a new store.
    try:
        tracker = Tracker(plan.tracking_uri, sweep.name, plan.sweep_dir / "mlflow-unlogged.jsonl",
                          replay_hint=plan.resume_command, background=True)
    except Exception as exc:  # noqa: BLE001  a store MLflow cannot open: nothing is recorded yet
        raise SweepError(f"--tracking-uri {plan.tracking_uri}: MLflow cannot open it ({_first_line(exc)})") from None
    try:
        _start_ray(plan.address)
        check_shared_storage(plan.sweep_dir.parent)
        resources, _need, concurrent = trial_resources(sweep, ray.cluster_resources())
        try:
            tracker.wait_open()
        except Exception as exc:  # noqa: BLE001
            raise SweepError(f"--tracking-uri {plan.tracking_uri}: MLflow cannot open it "
                             f"({_first_line(exc)})") from None
    except BaseException:
        tracker.discard()
        raise
    # Written once the tracker exists: a sweep that cannot record is no sweep to resume.
    write_state(plan)
    sweep_key = declare_sweep(plan, tracker)
    results: list[CellResult] = []
    completed = False
    if view is not None:
        view.start(plan, sweep.cells())
    watch = InterruptWatch().install()
    try:
        cells = sweep.cells()
        recorders: dict[str, Recorder] = {}
        for cell in cells:
            recorder = Recorder(sweep, cell, tracker, sweep_key)
            if view is not None:
                recorder.on_change = lambda r=recorder: view.update(r)
                recorder.on_done = lambda r=recorder: view.cell_done(r)
            recorders[cell.slug] = _ACTIVE[cell.slug] = recorder
        quiet = TrialFailureFilter().install()
        try:
            with watch.tune_fit():
                _tuner(plan, concurrent, resources).fit()
            ended = _reconcile(plan, recorders)
        finally:
            quiet.remove()
            for cell in cells:
                _ACTIVE.pop(cell.slug, None)
        unfinished = [cell for cell in cells if ended[cell.slug] < sweep.trials]
        if unfinished:
            raise SweepInterrupted(f"interrupted in cell {unfinished[0].label}; finish the sweep with: "
                                   f"{plan.resume_command}")
        results = [recorders[cell.slug].result for cell in cells]
        tracker.set_status(sweep_key, "finished")
        completed = True
    finally:
        watch.remove()
        if not completed:
            tracker.end_open_runs()
        message = tracker.close()
        if view is not None:
            view.stop()
        if message:
            print(message)
    return results


def write_state(plan: Plan) -> None:
    """Write ``sweep.json`` (what --resume checks and continues) unless it exists; atomically, so
    a driver killed mid-write leaves no half file that --resume could not read."""
    state_file = plan.sweep_dir / "sweep.json"
    if state_file.exists():
        return
    state = {"sweep": _jsonable(plan.sweep.to_dict()), "space_file": plan.space_path,
             "space": space_fingerprint(plan.sweep, plan.space),
             "tracking_uri": plan.tracking_uri, "sweep_id": plan.sweep_id, "started": time.time()}
    # Its own user only: the folder holds pickles (Tune's state, the searchers') that a resume loads.
    plan.sweep_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = state_file.with_name(f".sweep.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_file)


def declare_sweep(plan: Plan, tracker: Tracker) -> str:
    """Declare the sweep's MLflow run (with its settings as params); returns its key."""
    sweep = plan.sweep
    tracker.declare(plan.sweep_key, sweep.name, "sweep", **{"samtune.space_file": plan.space_path,
                                                            "samtune.sweep_id": plan.sweep_id})
    tracker.log_params(plan.sweep_key, {k: v for k, v in sweep.to_dict().items() if k != "fixed"}
                       | {f"fixed.{k}": v for k, v in sweep.fixed.items()})
    return plan.sweep_key


def _reconcile(plan: Plan, recorders: dict[str, Recorder]) -> dict[str, int]:
    """Bring each cell's records up to Tune's saved state; return how many trials of each cell
    (by slug) have ended.

    A trial that ended while an earlier driver ran (the sweep is resumed) produces no callback in
    this one: its row is rebuilt from Tune's per-trial progress table, and its MLflow run is found
    by its trial key and completed. Steps already in MLflow are skipped, so an earlier driver
    killed between a trial's result and its MLflow write leaves no gap and no duplicate.
    """
    from ray.tune import ExperimentAnalysis

    ended = {slug: 0 for slug in recorders}
    try:
        analysis = ExperimentAnalysis(str(plan.sweep_dir / TUNE_DIR))
    except Exception:  # noqa: BLE001  no state written: nothing ended
        return ended
    cells = plan.sweep.cells()
    rates = [c.label_noise_rate for c in cells]
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
        if plan.resume and ended[slug] >= plan.sweep.trials:
            lost = recorder.tracker.retire_unknown_trials(recorder.cell_key, known[slug])
            for key in lost:
                log.warning("trial %s was started by the killed driver before Tune saved it; Tune ran "
                            "another trial in its place, and its MLflow run is tagged samtune.role=lost", key)
    return ended


def load_study(sweep_dir: str | os.PathLike, cell: Cell):
    """The Optuna study of one cell as Tune last saved it (an ``optuna.Study``), e.g. for
    ``optuna.visualization`` or ``optuna.importance``; its trials are the cell's Tune trials, in
    order, COMPLETE / PRUNED (stopped by ASHA) / FAIL. The space file must still exist (the
    saved searcher refers to it). Raises FileNotFoundError when the sweep never started.
    """
    folder = Path(sweep_dir) / TUNE_DIR
    # One file per driver session, named by the session's start time; the newest name is the
    # last session's searcher. Not by mtime: Tune's sync to the storage path rewrites the older
    # sessions' files too, so their mtimes say nothing about which is current.
    saved = sorted(folder.glob("searcher-state-*.pkl"), key=lambda f: (f.name, f.stat().st_mtime))
    if not saved:
        raise FileNotFoundError(f"no saved Optuna searcher in {folder}: the sweep never started")
    with open(saved[-1], "rb") as fh:
        state = pickle.load(fh)  # noqa: S301  written by this sweep's own driver
    searchers = state.get("searchers", [])
    if cell.index >= len(searchers):
        raise FileNotFoundError(f"the searcher saved in {folder} has no cell {cell.label}")
    return searchers[cell.index]._ot_study


def summarize(plan: Plan, results: list[CellResult]) -> list[dict[str, Any]]:
    """Per cell: the best SGD and best SAM-family trial by the sweep's metric, with test error."""
    sweep = plan.sweep
    rows = []
    for res in results:
        entry: dict[str, Any] = {"cell": res.cell.label, "trials": len(res.trials),
                                 "failed": sum(r.status == "failed" for r in res.trials.values()),
                                 "diverged": sum(r.status == "diverged" for r in res.trials.values())}
        for family, names in (("sgd", ("sgd",)), ("sam", ("sam", "asam"))):
            # One pick over the whole family, so a finished ASAM trial is not passed over for a
            # SAM trial that ASHA stopped.
            entry[family] = res.best(sweep.metric, sweep.mode, names)
        rows.append(entry)
    return rows


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


__all__ += ["SpaceError", "Plan", "summarize", "trial_resources", "load_study", "AshaAwareOptunaSearch",
            "write_state", "declare_sweep"]

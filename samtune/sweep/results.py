"""What a sweep's trials came to: a row per trial as the driver saw it (`TrialRow`), collected
per cell (`CellResult`, with its best trial), the best SGD and SAM trial of each cell
(`summarize`), and a cell's Optuna study (`load_study`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from samtune.contract.messages import masked
from samtune.sweep.optuna_storage import open_storage, study_name
from samtune.sweep.plan import TUNE_DIR, Plan
from samtune.sweep.study import Cell

if TYPE_CHECKING:
    from optuna.study import Study
    from ray.tune import Checkpoint

#: The picks of a cell's search, by name: the best trial of each optimizer family.
PICK_FAMILIES = {"best_sgd": ("sgd",), "best_sam": ("sam", "asam")}


@dataclass
class TrialRow:
    """One trial as the live view and the summary see it."""

    trial_id: str
    params: dict[str, Any]
    status: str = "pending"
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # why a failed trial failed: its exception's last line
    # The metrics of its epoch of lowest validation error (early stopping on the noisy
    # validation set), beside `metrics`, its last epoch's.
    best_epoch: dict[str, Any] = field(default_factory=dict)
    # Its place in its cell's search (`trial_number`): ties between picks go to the lower one.
    number: int | None = None
    # One of its cell's declared baselines: the verdict of a cell that lost one says so.
    baseline: bool = False
    # Its last Tune checkpoint (a `ray.tune.Checkpoint`) once it ended: a pick's final weights.
    checkpoint: Checkpoint | None = None

    @property
    def optimizer(self) -> str:
        return str(self.params.get("optimizer", "sgd"))


@dataclass
class CellResult:
    cell: Cell
    trials: dict[str, TrialRow] = field(default_factory=dict)
    # The confirmation stage's runs, by `confirms` name and seed (`samtune.sweep.confirm`).
    reruns: dict[tuple[str, int], TrialRow] = field(default_factory=dict)
    # Picks whose runs another pick's are (same settings): name -> the name that ran them.
    aliases: dict[str, str] = field(default_factory=dict)
    # What they say (`samtune.sweep.verdicts.cell_verdict`), once the stage has run.
    verdict: dict[str, Any] | None = None

    def missing(self) -> str:
        """What this cell's verdict lacks, and why: a baseline trial that failed, or an optimizer
        with no trial that ran to compare; '' when it lacks nothing."""
        reasons = [
            f"its {row.optimizer.upper()} baseline failed ({row.error or 'no error was recorded'})"
            for row in self.trials.values()
            if row.baseline and row.status == "failed"
        ]
        ran = {row.optimizer for row in self.trials.values() if row.status in ("finished", "stopped")}
        for name, family in (("SGD", {"sgd"}), ("SAM", {"sam", "asam"})):
            if self.trials and not ran & family:
                reasons.append(f"no {name} trial of the search finished")
        return "; ".join(reasons)

    def best(self, metric: str, mode: str, optimizer: str | tuple[str, ...] | None = None) -> TrialRow | None:
        """The best trial by `metric` (of `optimizer`, a name or several), among the trials that
        ran their whole budget; among the ones ASHA stopped only when none did. A stopped
        trial's metric is from an earlier epoch, often lower than any final value after a
        cosine schedule's warm phase, and would otherwise win on that alone."""
        sign = 1.0 if mode == "min" else -1.0
        names = (optimizer,) if isinstance(optimizer, str) else optimizer
        for status in ("finished", "stopped"):
            rows = [
                r
                for r in self.trials.values()
                if r.status == status and finite(r.metrics.get(metric)) and (names is None or r.optimizer in names)
            ]
            if rows:
                # A tie goes to the trial suggested first: not to whichever happened to end first.
                return min(rows, key=lambda r: (sign * r.metrics[metric], _order(r)))
        return None

    def picks(self, metric: str, mode: str) -> dict[str, TrialRow]:
        """The search's picks (`PICK_FAMILIES`): its best SGD and best SAM-family trial by
        `metric` (`best`), those it has."""
        found = {name: self.best(metric, mode, family) for name, family in PICK_FAMILIES.items()}
        return {name: row for name, row in found.items() if row is not None}


def _order(row: TrialRow) -> tuple[float, str]:
    return (math.inf if row.number is None else row.number, row.trial_id)


def load_study(sweep_dir: str | os.PathLike, cell: Cell) -> Study:
    """The Optuna study of one cell (an ``optuna.Study``), e.g. for ``optuna.visualization`` or
    ``optuna.importance``; its trials are the cell's Tune trials, in order, COMPLETE / PRUNED
    (stopped by ASHA) / FAIL. Read from the sweep's Optuna storage (sweep.json names it); for a
    sweep from before storages, from its searcher as Tune last saved it (the space file must then
    still exist: the saved searcher refers to it). Raises FileNotFoundError when the sweep never
    started.
    """
    state_file = Path(sweep_dir) / "sweep.json"
    saved = json.loads(state_file.read_text()) if state_file.exists() else {}
    if saved.get("optuna_storage"):
        import optuna

        name = study_name(saved["sweep"]["name"], cell)
        try:
            return optuna.load_study(study_name=name, storage=open_storage(saved["optuna_storage"]))
        except KeyError:
            raise FileNotFoundError(
                f"no study {name!r} in the sweep's Optuna storage {masked(saved['optuna_storage'])}"
            ) from None
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
        entry: dict[str, Any] = {
            "cell": res.cell.label,
            "trials": len(res.trials),
            "failed": sum(r.status == "failed" for r in res.trials.values()),
            "diverged": sum(r.status == "diverged" for r in res.trials.values()),
        }
        for family, names in (("sgd", ("sgd",)), ("sam", ("sam", "asam"))):
            # One pick over the whole family, so a finished ASAM trial is not passed over for a
            # SAM trial that ASHA stopped.
            entry[family] = res.best(sweep.metric, sweep.mode, names)
        rows.append(entry)
    return rows


def finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and math.isfinite(value)

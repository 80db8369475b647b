"""A cell's baseline trials: configurations a reader can name, run before the search's own.

A baseline is declared, not sampled: the Sweep's ``baselines`` (default: SGD, and SAM at the SAM
paper's defaults, `samtune.contract.keys.PAPER_BASELINES`) give some settings; every other
setting the space searches in that branch takes the Sweep's ``baseline_params`` value, else the
trial key's default (``lr`` 0.05, ``weight_decay`` 5e-4, ...). The space runs once per baseline
on a trial that answers from those values, so conditional parameters come out as in a sweep; a
declared value the space's range or choices do not hold is refused before any trial. The
searcher enqueues each baseline's answers as a trial to evaluate first (Optuna's
``enqueue_trial``), and ASHA never stops a baseline (`samtune.sweep.search.CellScheduler`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from samtune.contract.keys import DEFAULTS, PAPER_BASELINES
from samtune.contract.values import SpaceError
from samtune.sweep.study import Sweep
from samtune.sweep.validate import validate_trial_config


@dataclass(frozen=True)
class Baseline:
    """One baseline: the values the space's suggestions get (``point``), the declared settings
    the space does not search (``extras``, added to the trial config), its name, and everything
    it adds to its cell's base config (``settings``: the space's constants too)."""

    name: str
    point: dict[str, Any]
    extras: dict[str, Any]
    settings: dict[str, Any]


class _DeclaredTrial:
    """Answers a space's suggest calls from declared values, then the trial keys' defaults."""

    def __init__(self, values: dict[str, Any], where: str):
        self.values, self.where = values, where
        self.params: dict[str, Any] = {}

    def _answer(self, name: str, fits: Callable[[Any], bool], offered: str) -> Any:
        declared = name in self.values
        value = self.values[name] if declared else DEFAULTS.get(name)
        if not fits(value):
            source = "declared" if declared else "its default"
            raise SpaceError(
                f"{self.where}{name}={value!r} ({source}) is not among what the space offers "
                f"({offered}); declare a value it offers in baseline_params or baselines"
            )
        self.params[name] = value
        return value

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self._answer(name, lambda v: _number(v) and low <= v <= high, f"{low:g} to {high:g}")

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._answer(name, lambda v: _number(v) and v == int(v) and low <= v <= high, f"{low} to {high}")

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._answer(name, lambda v: v in list(choices), f"one of {list(choices)}")

    def suggest_uniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high)

    def suggest_loguniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high, log=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _offered_optimizers(samples: list[dict[str, Any]]) -> set[str]:
    return {p["optimizer"] for p in samples if isinstance(p.get("optimizer"), str)}


def baseline_trials(sweep: Sweep, space: Callable[[Any], Any], sampled: list[dict[str, Any]]) -> list[Baseline]:
    """The cell's baselines, in order (SGD first by default). ``sampled`` are parameter dicts the
    space produced (`samtune.sweep.check.check_space`): without declared ``baselines``, only the
    paper baselines of optimizers the space offers run, and none when it offers fewer than two.
    Raises SpaceError for a declared value the space cannot take, or a config that fails checks.

    >>> sweep = Sweep(name="demo", dataset="digits", model="cnn", epochs=2, batch_size=32, trials=4)
    >>> def space(trial):
    ...     if trial.suggest_categorical("optimizer", ["sgd", "sam"]) == "sam":
    ...         trial.suggest_float("rho", 0.01, 0.5, log=True)
    ...     trial.suggest_float("lr", 0.01, 0.5, log=True)
    >>> [(b.name, b.point) for b in baseline_trials(sweep, space, [{"optimizer": "sgd"}, {"optimizer": "sam"}])]
    [('sgd', {'optimizer': 'sgd', 'lr': 0.05}), ('sam_baseline', {'optimizer': 'sam', 'rho': 0.05, 'lr': 0.05})]
    """
    declared = sweep.baselines
    if declared is None:
        offered = _offered_optimizers(sampled)
        if len(offered) < 2:
            return []
        declared = tuple(b for b in PAPER_BASELINES if b["optimizer"] in offered)
    if sweep.trials < len(declared):
        return []
    out: list[Baseline] = []
    for i, values in enumerate(declared):
        where = f"baselines[{i}]: "
        trial = _DeclaredTrial({**sweep.baseline_params, **values}, where)
        returned = space(trial) or {}
        extras = {k: v for k, v in values.items() if k not in trial.params}
        config = {**sweep.base_config(sweep.cells()[0]), **returned, **trial.params, **extras}
        validate_trial_config(config, where=where)
        name = "sgd" if config.get("optimizer") == "sgd" else f"{config.get('optimizer')}_baseline"
        if any(b.name == name for b in out):
            name = f"{name}{i}"
        out.append(Baseline(name, dict(trial.params), extras, {**returned, **trial.params, **extras}))
    return out

"""Dry-running a search space before any trial: `check_space` runs ``space(trial)`` on sampled
Optuna trials and validates every value it can produce in every cell; `space_fingerprint` records
what a space searches, so that ``--resume`` refuses a changed one; `fixed_trial_config` builds
the one trial ``samtune train FILE --params ...`` runs by hand.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samtune.contract.messages import first_line
from samtune.contract.values import SpaceError
from samtune.sweep.space_file import display, where_in
from samtune.sweep.study import Cell, Sweep, study_key_error
from samtune.sweep.validate import (
    check_metric_reported,
    trial_spec,
    validate_trial_config,
)

log = logging.getLogger(__name__)


@dataclass
class _Suggestion:
    name: str
    kind: str  # "float" | "int" | "categorical"
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    line: str = ""


class _CheckingTrial:
    """Wraps an Optuna trial: records every suggest call and rejects empty or invalid ranges."""

    def __init__(self, trial: Any, path: Path) -> None:
        self._trial = trial
        self._path = str(path)
        self._shown = display(path)
        self.suggestions: list[_Suggestion] = []

    def _line(self) -> str:
        for frame in reversed(traceback.extract_stack()):
            if os.path.abspath(frame.filename) == self._path:
                return f"{self._shown}:{frame.lineno}: "
        return f"{self._shown}: "

    def _check_name(self, name: Any, line: str) -> None:
        if not isinstance(name, str):
            raise SpaceError(f"{line}parameter name {name!r} is not a string")
        trial_spec(name, line)
        if (error := study_key_error(name, f"{line}space suggests {name!r}")) is not None:
            raise error

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        line = self._line()
        self._check_name(name, line)
        for bound in (low, high):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise SpaceError(f"{line}{name}: range bounds must be finite numbers, got {low!r}..{high!r}")
        if low > high:
            raise SpaceError(f"{line}{name}: empty range: low={low:g} is above high={high:g}")
        if log and low <= 0:
            raise SpaceError(f"{line}{name}: a log range needs low > 0, got low={low:g}")
        if step is not None and log:
            raise SpaceError(f"{line}{name}: step and log=True cannot be combined")
        self.suggestions.append(_Suggestion(name, "float", low, high, step, log, line=line))
        return self._trial.suggest_float(name, low, high, step=step, log=log)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        line = self._line()
        self._check_name(name, line)
        for bound in (low, high, step):
            if isinstance(bound, bool) or not isinstance(bound, int):
                raise SpaceError(
                    f"{line}{name}: suggest_int needs integer bounds and step, got "
                    f"low={low!r}, high={high!r}, step={step!r}"
                )
        if low > high:
            raise SpaceError(f"{line}{name}: empty range: low={low} is above high={high}")
        if step < 1:
            raise SpaceError(f"{line}{name}: step must be >= 1, got {step}")
        if log and low <= 0:
            raise SpaceError(f"{line}{name}: a log range needs low > 0, got low={low}")
        self.suggestions.append(_Suggestion(name, "int", low, high, step, log, line=line))
        return self._trial.suggest_int(name, low, high, step=step, log=log)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        line = self._line()
        self._check_name(name, line)
        if not isinstance(choices, (list, tuple)) or not choices:
            raise SpaceError(f"{line}{name}: empty choices: expected a non-empty list")
        self.suggestions.append(_Suggestion(name, "categorical", choices=tuple(choices), line=line))
        return self._trial.suggest_categorical(name, choices)

    # Optuna's deprecated aliases, for old space files.
    def suggest_uniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high)

    def suggest_loguniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high, log=True)

    def suggest_discrete_uniform(self, name: str, low: float, high: float, q: float) -> float:
        return self.suggest_float(name, low, high, step=q)

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__"):
            raise AttributeError(item)
        if item == "number":  # the trial's place in its study: the dry runs have one too
            return getattr(self._trial, item)
        # A space runs on Optuna's trials during the search, but also on the cell's declared
        # baselines and on these dry runs, which hold values and nothing else: anything beyond
        # suggesting would fail (or mean something else) there, so it is refused here, first.
        raise SpaceError(
            f"{self._line()}space(trial) uses trial.{item}: a space may only call trial.suggest_float, "
            "suggest_int and suggest_categorical (its trials are also the declared baselines, "
            "which hold values only); keep other state outside the space"
        )


def _candidates(s: _Suggestion) -> list[Any]:
    """Values worth validating for a suggestion: every choice, every int (at most 64 of them,
    evenly spread, bounds included), the bounds of a float range."""
    if s.kind == "categorical":
        return list(s.choices)
    if s.kind == "int":
        values = range(s.low, s.high + 1, s.step)
        if len(values) <= 64:
            return list(values)
        return sorted({values[round(i * (len(values) - 1) / 63)] for i in range(64)})
    return [s.low, s.high]


def check_space(
    sweep: Sweep, space: Callable[[Any], Any], samples: int = 64, with_constants: bool = False
) -> list[dict[str, Any]]:
    """Run ``space`` on ``samples`` random Optuna trials and validate everything it can produce.

    Every suggest call is checked (known setting, not one the Sweep fixes, non-empty range, every
    value of a range valid for its setting, e.g. ``rho >= 0`` and each ``m`` dividing the
    per-worker batch), and so is each whole trial config in every cell. Returns the sampled
    parameter dicts: the suggested values only, or with ``with_constants`` also the constants
    the space returns (what a trial gets). Raises SpaceError naming the first problem, with file
    and line.
    """
    import optuna

    path = Path(getattr(space, "path", "<space>"))
    shown = display(path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sweep.seed))
    cells = sweep.cells()
    sampled: list[dict[str, Any]] = []
    # Whole ranges are checked against the first few trials each suggestion appears in; a bad
    # value shows there already, and checking every sample again would cost seconds.
    range_checks: dict[str, int] = {}
    for _ in range(samples):
        trial = study.ask()
        proxy = _CheckingTrial(trial, path)
        try:
            returned = space(proxy)
        except SpaceError:
            raise
        except Exception as exc:  # noqa: BLE001  user code: name it with its line
            where = where_in(path.resolve(), exc.__traceback__).replace(str(path.resolve()), shown)
            raise SpaceError(f"{where}space(trial) raised {type(exc).__name__}: {first_line(exc)}") from None
        if returned is not None and not isinstance(returned, dict):
            raise SpaceError(f"{shown}: space(trial) returned a {type(returned).__name__}; expected a dict or None")
        suggested = dict(trial.params)
        params = _with_constants(suggested, returned, shown)
        to_check = [s for s in proxy.suggestions if range_checks.get(s.name, 0) < 4]
        for s in to_check:
            range_checks[s.name] = range_checks.get(s.name, 0) + 1
        for cell in cells:
            config = sweep.trial_config(cell, params)
            validate_trial_config(config, where=f"{shown}: space(trial) gave ")
            # A space may return val_fraction or the sharpness settings itself.
            check_metric_reported(sweep.metric, config, where=f"{shown}: space(trial) gave ")
            for s in to_check:
                for value in _candidates(s):
                    try:
                        validate_trial_config({**config, s.name: value})
                    except SpaceError as exc:
                        rng = (
                            f"choices {list(s.choices)}"
                            if s.kind == "categorical"
                            else f"range [{s.low:g}, {s.high:g}]"
                        )
                        raise SpaceError(f"{s.line}{s.name} {rng} includes a bad value: {exc}") from None
        sampled.append(params if with_constants else suggested)
        study.tell(trial, 0.0)
    return sampled


def _with_constants(suggested: dict[str, Any], returned: dict[str, Any] | None, shown: str) -> dict[str, Any]:
    """A trial's settings: the suggested values and the constants the space returned, each key
    a setting a space may return and none both suggested and returned."""
    params = dict(suggested)
    for key, value in (returned or {}).items():
        if not isinstance(key, str):
            raise SpaceError(f"{shown}: space(trial) returned a non-string key {key!r}")
        _check_returned_key(key, shown)
        if key in suggested:
            # The returned constant would win over the suggestion in every trial, baselines
            # included, while the search believed it was searching the setting.
            raise SpaceError(
                f"{shown}: space(trial) suggests {key!r} and also returns {key}={value!r}, which "
                f"would replace every suggested value; suggest it or return it, not both"
            )
        params[key] = value
    return params


def space_fingerprint(sweep: Sweep, space: Callable[[Any], Any], samples: int = 32) -> dict[str, str]:
    """What a study searches, in a form a resumed sweep compares with: each parameter's Optuna
    distribution and each constant the space returns, from ``samples`` seeded random trials.

    A resumed study that met other choices or ranges would mix two search spaces in one study
    (and Optuna fails on a categorical value it never saw), so a change here refuses the resume.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sweep.seed))
    seen: dict[str, str] = {}
    for _ in range(samples):
        trial = study.ask()
        returned = space(trial) or {}
        seen.update({name: repr(dist) for name, dist in trial.distributions.items()})
        seen.update({f"returned {key}": repr(value) for key, value in returned.items()})
        study.tell(trial, 0.0)
    return dict(sorted(seen.items()))


def searched_settings(fingerprint: dict[str, str]) -> frozenset[str]:
    """The settings a study's space suggests (not the constants it returns), from its
    `space_fingerprint`."""
    return frozenset(key for key in fingerprint if not key.startswith("returned "))


def fingerprint_changes(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """What differs between two `space_fingerprint`s, one phrase each."""
    changes = [f"{k}: was {before[k]}, now {now[k]}" for k in before if k in now and before[k] != now[k]]
    changes += [f"{k} is new ({now[k]})" for k in now if k not in before]
    changes += [f"{k} is gone" for k in before if k not in now]
    return changes


def _check_returned_key(key: str, shown: str) -> None:
    trial_spec(key, f"{shown}: space(trial) returned ")
    if (error := study_key_error(key, f"{shown}: space(trial) returned {key!r}")) is not None:
        raise error


def fixed_trial_config(sweep: Sweep, space: Callable[[Any], Any], cell: Cell, params: dict[str, Any]) -> dict[str, Any]:
    """The trial config the sweep would run in ``cell`` if the space suggested ``params``.

    ``space`` runs on an Optuna ``FixedTrial`` holding ``params``, so conditional parameters and
    the constants the space returns come out exactly as in a sweep; ``params`` the space does not
    ask for in that branch are added as trial settings all the same (e.g. ``weight_decay``).
    Raises SpaceError when the space asks for a parameter ``params`` lacks, when ``params`` sets a
    key the Sweep fixes per cell (use ``--set``), or when the result fails validation.
    """
    import optuna

    for key in params:
        trial_spec(key, "--params: ")
        if (error := study_key_error(key, f"--params {key}=...")) is not None:
            raise error
    trial = optuna.trial.FixedTrial(dict(params))
    try:
        returned = space(trial) or {}
    except ValueError as exc:
        missing = str(exc).split("'")[1] if str(exc).count("'") >= 2 else None
        if missing is not None and "not found" in str(exc):
            raise SpaceError(
                f"--params: the space asks for {missing!r} in this branch; add it, e.g. --params {missing}=..."
            ) from None
        raise SpaceError(f"space(trial) raised ValueError: {first_line(exc)}") from None
    config = {**sweep.base_config(cell), **returned, **trial.params, **params}
    return validate_trial_config(config, where="")

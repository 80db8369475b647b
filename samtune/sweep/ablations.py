"""Ablations: one searched setting of a cell's confirmed pick moved at a time, on the confirmation
seeds, so each setting gets a curve with intervals and a robust range (`samtune.verdicts`).

``Sweep(ablations=...)`` names the settings and their values: ``rho`` (values; None: a log grid
of `RHO_POINTS` over the space's range of rho), ``lr`` (multipliers of the pick's learning rate;
None: `LR_MULTIPLIERS`), ``m`` (values; None: `M_VALUES`, those dividing the per-worker batch).
The best SAM configuration moves each; the best SGD configuration moves ``lr`` too. Runs are
named ``rho=0.02``, ``lr=x0.5``, ``sgd lr=x0.5`` and ``m=16`` (`ablation_name`), in that order
of settings and the order of their values, so a sweep asks for the same runs every time.

>>> normalised({"lr": None, "rho": (0.02, 0.1)}, m_ablation=(None, 16))
{'m': (None, 16), 'rho': (0.02, 0.1), 'lr': (0.25, 0.5, 2.0, 4.0)}
>>> picks = ablation_picks({"m": (None, 16), "lr": (0.5,)}, {"optimizer": "sam", "lr": 0.1, "rho": 0.05},
...                        {"optimizer": "sgd", "lr": 0.2})
>>> [(name, s["lr"], s.get("m")) for name, s in picks.items()]
[('m=None', 0.1, None), ('m=16', 0.1, 16), ('lr=x0.5', 0.05, None), ('sgd lr=x0.5', 0.1, None)]
>>> ablated_setting("sgd lr=x0.5"), ablated_setting("rho=0.02"), ablated_setting("best_sam")
('lr', 'rho', None)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from samtune.contract.keys import TRIAL_KEYS
from samtune.contract.values import Setting, SpaceError, suggest

#: The settings an ablation may move, in the order their runs are asked for.
ABLATABLE = ("m", "rho", "lr")
#: The default grids: m as the m-sharpness study's, lr as multipliers of the pick's.
M_VALUES: tuple[int | None, ...] = (None, 32, 16, 8, 4)
LR_MULTIPLIERS = (0.25, 0.5, 2.0, 4.0)
#: Values of the default rho grid (log-spaced over the space's range).
RHO_POINTS = 5
#: The SAM paper's defaults, marked on the curves: rho = 0.05, m the whole batch (None).
PAPER_DEFAULTS: dict[str, Any] = {"rho": 0.05, "m": None}
_MULTIPLIER = Setting("float", low=0.0, low_open=True, doc="a multiplier of the pick's learning rate")


def normalised(ablations: Any, m_ablation: tuple[int | None, ...] = ()) -> dict[str, tuple[Any, ...] | None]:
    """``ablations`` (a dict of setting -> values or None, or a tuple of setting names) as a dict
    in `ABLATABLE` order with validated values; ``m_ablation`` (the older spelling) is its ``m``.
    Only rho keeps None (its grid needs the space). Raises SpaceError (one line)."""
    if isinstance(ablations, str):
        ablations = (ablations,)
    if isinstance(ablations, (list, tuple)):
        ablations = dict.fromkeys(ablations)
    if not isinstance(ablations, dict):
        raise SpaceError(
            f"ablations={ablations!r}: expected a dict of setting -> values (None: its default grid), "
            "e.g. {'rho': None, 'lr': (0.5, 2)}"
        )
    for key in ablations:
        if key not in ABLATABLE:
            raise SpaceError(
                f"ablations: {key!r} is not a setting an ablation moves{suggest(str(key), ABLATABLE)}; "
                f"expected one of {', '.join(ABLATABLE)}"
            )
    if m_ablation and "m" in ablations:
        raise SpaceError("m_ablation and ablations['m'] both set the m ablation; give it once, in ablations")
    given = dict(ablations)
    if m_ablation:
        given["m"] = tuple(m_ablation)
    out: dict[str, tuple[Any, ...] | None] = {}
    for key in ABLATABLE:
        if key in given:
            out[key] = _values(key, given[key])
    return out


def _values(key: str, values: Any) -> tuple[Any, ...] | None:
    if values is None:
        return {"m": M_VALUES, "lr": LR_MULTIPLIERS}.get(key)
    if key == "m" and isinstance(values, int):
        values = (values,)
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (list, tuple)) or not values:
        raise SpaceError(f"ablations[{key!r}]={values!r}: expected a non-empty tuple of values, or None")
    if key == "lr":
        return tuple(_MULTIPLIER.validate(f"ablations['lr'] (multipliers of the pick's lr) {v!r}", v) for v in values)
    checked = tuple(TRIAL_KEYS[key].validate(f"ablations[{key!r}]", v) for v in values)
    if key == "rho" and any(v is None for v in checked):
        raise SpaceError(f"ablations['rho']={values!r}: every value must be a number >= 0")
    return checked


def rho_grid(low: float, high: float, points: int = RHO_POINTS) -> tuple[float, ...]:
    """``points`` values log-spaced from ``low`` to ``high`` (3 significant digits, so run names
    stay short); a range from 0 starts at high / 50, since a log grid cannot hold 0.

    >>> rho_grid(0.01, 0.5)
    (0.01, 0.0266, 0.0707, 0.188, 0.5)
    """
    low = low if low > 0 else high / 50
    if points == 1 or math.isclose(low, high):
        return (float(f"{high:.3g}"),)
    ratio = (high / low) ** (1 / (points - 1))
    return tuple(dict.fromkeys(float(f"{low * ratio**i:.3g}") for i in range(points)))


def space_range(space: Callable[[Any], Any] | None, name: str, seed: int = 0, samples: int = 32) -> tuple | None:
    """The (low, high) range a space suggests ``name`` from, over ``samples`` seeded random trials
    (the same every time); None where it never suggests it as a number."""
    if space is None:
        return None
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    lows, highs = [], []
    for _ in range(samples):
        trial = study.ask()
        space(trial)
        dist = trial.distributions.get(name)
        if isinstance(dist, (FloatDistribution, IntDistribution)):
            lows.append(float(dist.low))
            highs.append(float(dist.high))
        study.tell(trial, 0.0)
    return (min(lows), max(highs)) if lows else None


def ablation_name(setting: str, value: Any, of: str = "best_sam") -> str:
    """A run's name in the ablation: ``rho=0.02``, ``m=16``, ``lr=x0.5``, ``sgd lr=x0.5``."""
    shown = f"x{value:g}" if setting == "lr" else f"{value:g}" if isinstance(value, float) else str(value)
    return f"{'sgd ' if of == 'best_sgd' else ''}{setting}={shown}"


def ablated_setting(name: str) -> str | None:
    """The setting a run named ``name`` ablates (None: a pick, not an ablation)."""
    key = name.removeprefix("sgd ").split("=", 1)[0]
    return key if "=" in name and key in ABLATABLE else None


def ablation_picks(
    settings: dict[str, tuple[Any, ...] | None],
    best_sam: dict[str, Any] | None,
    best_sgd: dict[str, Any] | None,
    rho_range: tuple[float, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """The ablation's configurations by name, in order: for each of ``settings`` (already the
    cell's, m filtered to the batch), each value moved in the best SAM configuration (lr also in
    the best SGD one). rho's None grid spans ``rho_range`` (else x0.25..x4 of the pick's rho)."""
    out: dict[str, dict[str, Any]] = {}
    for setting, values in settings.items():
        for of, pick in (("best_sam", best_sam), ("best_sgd", best_sgd)):
            if pick is None or (of == "best_sgd" and setting != "lr"):
                continue
            for value in values if values is not None else _rho_default(pick, rho_range):
                moved = float(pick.get("lr", TRIAL_KEYS["lr"].default)) * value if setting == "lr" else value
                out[ablation_name(setting, value, of)] = {**pick, setting: moved}
    return out


def _rho_default(pick: dict[str, Any], rho_range: tuple[float, float] | None) -> tuple[float, ...]:
    if rho_range is not None:
        return rho_grid(*rho_range)
    own = float(pick.get("rho", TRIAL_KEYS["rho"].default))
    return rho_grid(own / 4, own * 4)


def planned_runs(settings: dict[str, tuple[Any, ...] | None]) -> int:
    """How many configurations `ablation_picks` gives for ``settings`` at most (before aliases)."""
    return sum(
        (RHO_POINTS if values is None else len(values)) * (2 if key == "lr" else 1) for key, values in settings.items()
    )


def ablation_text(settings: dict[str, tuple[Any, ...] | None]) -> str:
    """What a cell's ablations run, for the terminal.

    >>> ablation_text({"m": (None, 16), "rho": None, "lr": (0.5, 2.0)})
    'm = None, 16; rho on a log grid over the range searched; lr (SAM and SGD) x0.5, x2'
    """
    parts = []
    for key, values in settings.items():
        if values is None:
            parts.append(f"{key} on a log grid over the range searched")
        elif key == "lr":
            parts.append(f"lr (SAM and SGD) {', '.join(f'x{v:g}' for v in values)}")
        else:
            parts.append(f"{key} = {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}")
    return "; ".join(parts)

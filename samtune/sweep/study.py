"""The study a space file sets up: the `Sweep` (its cells, dataset, model, budget, resources and
what to optimise, validated when built by `samtune.sweep.sweep_checks`), its scenario `Cell`s,
the trial configs it derives, and the command line's ``--set`` changes to it (`apply_overrides`,
read by `samtune.sweep.assignments`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from samtune.contract.keys import SWEEP_FIELDS, TRIAL_KEYS
from samtune.contract.values import SpaceError, suggest
from samtune.data.human_noise import HUMAN_NOISE_RATES, kind_title
from samtune.sequential import Design, looks_between
from samtune.sweep.ablations import normalised
from samtune.sweep.assignments import parse_ablation, parse_assignments, parse_rates
from samtune.sweep.sweep_checks import MAX_NAME, SWEEP_SPECS, check_sweep, study_key_error
from samtune.sweep.validate import parse_trial_value

# Names defined in the modules above are offered here as well: the study's names in one place.
__all__ = [
    "MAX_NAME",
    "REQUIRED",
    "Cell",
    "Sweep",
    "apply_overrides",
    "parse_assignments",
    "study_key_error",
    "unknown_sweep_key",
]


@dataclass(frozen=True)
class Cell:
    """One scenario cell of a sweep: its own Optuna study, ASHA brackets and MLflow parent run."""

    index: int
    label_noise_rate: float
    label: str  # e.g. "noise=0.4": what the user reads and what MLflow tags carry
    label_noise_kind: str = "symmetric"

    @property
    def slug(self) -> str:
        """A directory-safe name, e.g. ``cell-1_noise-0.4``."""
        safe = "".join(c if c.isalnum() or c in ".-" else "-" for c in self.label)
        return f"cell-{self.index}_{safe}"


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """A study: which cells, which model, what budget, what resources, what to optimise.

    Cells: one per entry of ``label_noise_rates`` (the finetune scenario uses them too: finetuning
    under that much noise), then for each set of ``human_noise`` (e.g. ``("aggre", "worst")`` on
    CIFAR-10) a ``human:<set>`` cell at the file's measured rate and, with ``human_noise_twins``,
    its ``twin:<set>`` cell (`samtune.data.human_noise`). Per cell, ``trials`` Optuna trials of ``epochs`` epochs each; ASHA may
    stop a trial after ``grace_period`` epochs (None: a quarter of the epochs, at least 1).

    Resources: ``cpus_per_trial``/``gpus_per_trial`` is what one trial holds when ``workers == 1``;
    with ``workers > 1`` each Ray Train worker takes one CPU and, when ``gpus_per_trial > 0``, one
    GPU, so ``gpus_per_trial`` must then be 0 or equal to ``workers``.

    ``fixed`` adds settings to every trial config (any key of `TRIAL_KEYS` except the ones this
    class already sets). Construction validates everything and raises SpaceError (one line).

    Ablations (`samtune.sweep.ablations`), on the confirmation seeds of the cells whose rate is in
    ``ablation_rates`` (None: every cell): ``ablations={"rho": None, "lr": (0.5, 2)}`` moves one
    setting of the cell's best SAM configuration at a time (lr also of its best SGD one): rho to
    given values (None: a log grid over the space's range), lr by multipliers of the pick's (None:
    x0.25, x0.5, x2, x4), m to given values (None: 32, 16, 8, 4 and the whole batch).
    ``m_ablation``/``m_ablation_rates`` are the older spelling of the m entry and its cells.

    >>> sweep = Sweep(name="demo", dataset="digits", model="cnn", epochs=8, batch_size=32, trials=4,
    ...               label_noise_rates=(0.0, 0.4), fixed={"weight_decay": 5e-4})
    >>> [cell.label for cell in sweep.cells()], sweep.asha_grace_period
    (['noise=0', 'noise=0.4'], 2)
    >>> config = sweep.base_config(sweep.cell(0.4))
    >>> config["label_noise_rate"], config["epochs"], config["weight_decay"]
    (0.4, 8, 0.0005)
    >>> sweep.replace(workers=3)
    Traceback (most recent call last):
    samtune.contract.values.SpaceError: batch_size=32 is not divisible by workers=3
    """

    name: str
    dataset: str
    model: str
    epochs: int
    batch_size: int
    trials: int
    scenario: str = "label_noise"
    label_noise_rates: tuple[float, ...] = (0.0,)
    label_noise_kind: str = "symmetric"
    human_noise: tuple[str, ...] = ()
    human_noise_twins: bool = True
    workers: int = 1
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    metric: str = "val_error"
    mode: str = "min"
    seed: int = 0
    data_subset: int | None = None
    max_concurrent: int | None = None
    grace_period: int | None = None
    reduction_factor: float = 2.0
    sharpness_every: int = 0
    deterministic: bool = True
    search_batch: int = 2
    fixed: dict[str, Any] = field(default_factory=dict)
    baselines: tuple[dict[str, Any], ...] | None = None
    baseline_params: dict[str, Any] = field(default_factory=dict)
    confirm_seeds: int = 0
    max_confirm_seeds: int | None = None
    equivalence_margin: float = 0.01
    vary_noise_draw: bool = False
    m_ablation: tuple[int | None, ...] = ()
    m_ablation_rates: tuple[float, ...] | None = None
    ablations: dict[str, Any] = field(default_factory=dict)
    ablation_rates: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_sweep(self)

    def design(self) -> Design:
        """The verdicts' sequential design: a look after each round of confirmation seeds, from
        ``confirm_seeds`` to ``max_confirm_seeds``, and the equivalence margin."""
        last = self.max_confirm_seeds if self.max_confirm_seeds is not None else self.confirm_seeds
        return Design(looks=looks_between(self.confirm_seeds, last), margin=self.equivalence_margin)

    def ablation_ms(self, cell: Cell | None = None) -> tuple[int | None, ...]:
        """The m values of the m ablation (of ``cell``: none outside its rates) that divide the
        per-worker batch (None: the whole batch). It runs on the confirmation seeds, so not at
        all with ``confirm_seeds=0``."""
        return self.ablated(cell).get("m") or ()

    def ablated(self, cell: Cell | None = None) -> dict[str, tuple[Any, ...] | None]:
        """The settings ablated (in ``cell``), with their values (`samtune.sweep.ablations`; m
        only those dividing the per-worker batch, rho None for the grid over the space's range);
        empty with ``confirm_seeds=0``. m's cells are ``m_ablation_rates`` when given."""
        if not self.confirm_seeds:
            return {}
        out = {}
        for key, values in normalised(self.ablations, self.m_ablation).items():
            rates = self.m_ablation_rates if key == "m" and self.m_ablation_rates is not None else self.ablation_rates
            if cell is not None and rates is not None and cell.label_noise_rate not in rates:
                continue
            if key == "m" and values is not None:
                local = self.batch_size // self.workers
                values = tuple(m for m in values if m is None or local % m == 0)
            if values is None or values:
                out[key] = values
        return out

    def cells(self) -> list[Cell]:
        """The scenario cells, in the order given."""
        suffix = "" if self.label_noise_kind == "symmetric" else f" {self.label_noise_kind}"
        cells = [
            Cell(i, r, f"noise={r:g}{suffix}", self.label_noise_kind) for i, r in enumerate(self.label_noise_rates)
        ]
        for name in self.human_noise:
            for mode in ("human", "twin") if self.human_noise_twins else ("human",):
                kind = f"{mode}:{name}"
                cells.append(Cell(len(cells), HUMAN_NOISE_RATES[kind], kind_title(kind), kind))
        return cells

    def cell(self, rate: float | str) -> Cell:
        """The cell for a noise rate (``0.4`` or ``"0.4"`` or ``"noise=0.4"``), or of a human noise
        kind (``"human:aggre"``, ``"twin:aggre"``); SpaceError if absent."""
        for cell in self.cells():
            if str(rate).strip() in (cell.label, cell.label_noise_kind) and cell.label_noise_kind in HUMAN_NOISE_RATES:
                return cell
        text = str(rate).strip().removeprefix("noise=")
        try:
            value = float(text)
        except ValueError:
            raise SpaceError(f"--cell {rate!r}: expected a label-noise rate such as 0.4") from None
        for cell in self.cells():
            if cell.label_noise_kind == self.label_noise_kind and math.isclose(
                cell.label_noise_rate, value, abs_tol=1e-12
            ):
                return cell
        raise SpaceError(
            f"--cell {rate}: this sweep has no such cell; its rates are "
            f"{', '.join(f'{r:g}' for r in self.label_noise_rates)}"
        )

    def base_config(self, cell: Cell) -> dict[str, Any]:
        """The trial config every trial of ``cell`` starts from (space values are added on top)."""
        config: dict[str, Any] = {
            "dataset": self.dataset,
            "model": self.model,
            "scenario": self.scenario,
            "label_noise_rate": cell.label_noise_rate,
            "label_noise_kind": cell.label_noise_kind,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            # One noisy dataset per cell, shared by every trial of it: trials differ only in the
            # settings being searched, so their results compare.
            "data_seed": self.seed,
            "data_subset": self.data_subset,
            "workers": self.workers,
            "use_gpu": self.gpus_per_trial > 0,
            "sharpness_every": self.sharpness_every,
        }
        config.update(self.fixed)
        return config

    def trial_config(self, cell: Cell, params: dict[str, Any]) -> dict[str, Any]:
        """Base config of ``cell`` plus the values a space produced for one trial."""
        return {**self.base_config(cell), **params}

    @property
    def asha_grace_period(self) -> int:
        # Clamped to the epochs, so `--set epochs=2` works on a file written for longer runs.
        grace = self.grace_period if self.grace_period is not None else max(1, self.epochs // 4)
        return min(grace, self.epochs)

    def replace(self, **changes: Any) -> Sweep:
        """A copy with ``changes`` applied and validated again."""
        unknown = [k for k in changes if k not in _FIELD_NAMES]
        if unknown:
            raise SpaceError(unknown_sweep_key(unknown[0]))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["label_noise_rates"] = list(self.label_noise_rates)
        if not self.human_noise:
            # A sweep without human noise records what it did before these fields existed, so a
            # sweep saved then resumes as the same sweep.
            del out["human_noise"], out["human_noise_twins"]
        else:
            out["human_noise"] = list(self.human_noise)
        if not self.ablations and self.ablation_rates is None:
            # Likewise a sweep without the generalised ablations.
            del out["ablations"], out["ablation_rates"]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Sweep:
        """Build from a plain dict; unknown or missing keys give a SpaceError naming them."""
        if not isinstance(values, dict):
            raise SpaceError(f"SWEEP must be Sweep(...) or a dict, got {type(values).__name__}")
        for key in values:
            if key not in _FIELD_NAMES:
                raise SpaceError(unknown_sweep_key(key))
        missing = [k for k in REQUIRED if k not in values]
        if missing:
            raise SpaceError(f"Sweep needs {', '.join(missing)} (missing)")
        return cls(**values)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Sweep))


REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(Sweep)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


def unknown_sweep_key(key: str) -> str:
    return (
        f"Sweep has no setting {key!r}{suggest(key, _FIELD_NAMES)}; "
        f"settings: {', '.join(_FIELD_NAMES)} (trial settings go in fixed={{...}})"
    )


def apply_overrides(sweep: Sweep, assignments: Sequence[str]) -> Sweep:
    """Apply ``--set key=value`` items to ``sweep``: ``key`` is a Sweep setting or ``fixed.<trial key>``.

    Values are parsed by the setting's type (``label_noise_rates=0.0,0.4``; ``none`` for None).
    Raises SpaceError for an unknown key, a value of the wrong type, or a result that fails
    validation.

    >>> sweep = Sweep(name="demo", dataset="digits", model="cnn", epochs=8, batch_size=32, trials=4)
    >>> changed = apply_overrides(sweep, ["epochs=2", "label_noise_rates=0.2,0.6", "fixed.momentum=0.8"])
    >>> changed.epochs, changed.label_noise_rates, changed.fixed
    (2, (0.2, 0.6), {'momentum': 0.8})
    """
    changes: dict[str, Any] = {}
    fixed = dict(sweep.fixed)
    for item in assignments:
        for key, raw in parse_assignments([item]):
            if key.startswith("fixed."):
                sub = key.split(".", 1)[1]
                if sub in SWEEP_FIELDS:
                    raise SpaceError(f"--set {key}: {sub!r} is a Sweep setting; use --set {SWEEP_FIELDS[sub]}=...")
                fixed[sub] = parse_trial_value(sub, raw)
            elif key == "label_noise_rates":
                changes[key] = parse_rates(key, raw)
            elif key == "human_noise":
                changes[key] = tuple(part.strip() for part in raw.split(",") if part.strip())
            elif key in ("m_ablation_rates", "ablation_rates"):
                changes[key] = parse_rates(key, raw)
            elif key == "ablations":
                changes[key] = tuple(part.strip() for part in raw.split(",") if part.strip())
            elif key.startswith("ablations."):
                changes["ablations"] = {**changes.get("ablations", sweep.ablations), **parse_ablation(key, raw)}
            elif key == "m_ablation":
                changes[key] = tuple(parse_trial_value("m", part.strip()) for part in raw.split(",") if part.strip())
            elif key == "fixed":
                raise SpaceError("--set fixed=...: set one trial setting at a time, e.g. --set fixed.weight_decay=1e-4")
            elif key in SWEEP_SPECS:
                changes[key] = SWEEP_SPECS[key].parse(key, raw)
            else:
                hint = f"; for a trial setting use --set fixed.{key}=..." if key in TRIAL_KEYS else ""
                raise SpaceError(f"--set: {unknown_sweep_key(key)}{hint}")
    if fixed != sweep.fixed:
        changes["fixed"] = fixed
    try:
        return sweep.replace(**changes) if changes else sweep
    except SpaceError as exc:
        raise SpaceError(f"--set: {exc}") from None

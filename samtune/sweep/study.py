"""The study a space file sets up: the `Sweep` (its cells, dataset, model, budget, resources and
what to optimise, validated when built), its scenario `Cell`s, and the command line's ``--set``
changes to it (`apply_overrides`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from samtune.contract.keys import STUDY_KEYS, SWEEP_FIELDS, TRIAL_KEYS
from samtune.contract.metrics import reported_metrics
from samtune.contract.values import Setting, SpaceError, choice, suggest
from samtune.sequential import Design, looks_between
from samtune.sweep.validate import (
    TRIAL_SETTINGS,
    check_metric_reported,
    parse_trial_value,
    validate_trial_config,
)


def study_key_error(key: str, what: str) -> SpaceError | None:
    """The error for `what` (e.g. "space suggests 'epochs'") touching a key the study sets, with
    where it is set instead; None for a key anyone may set."""
    if key == "baseline":
        return SpaceError(f"{what}, which the sweep sets per trial (a cell's first SGD and SAM trials "
                          "are its baselines)")
    if key == "confirms":
        return SpaceError(f"{what}, which the sweep sets on its confirmation runs")
    if key == "trial_number":
        return SpaceError(f"{what}, which the sweep sets per trial (its place in its cell's search)")
    if key in STUDY_KEYS:
        owner = SWEEP_FIELDS.get(key, key)
        return SpaceError(f"{what}, which the Sweep fixes per cell; use --set {owner}=... "
                          f"(or Sweep({owner}=...) in the file)")
    return None


#: What a sweep name may hold: it names the MLflow experiment, a folder and the runs' keys, and a
#: quote or a slash would break one of them.
_NAME_CHARS = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._ -]*[A-Za-z0-9._-])?")


MAX_NAME = 100  # characters of a sweep name


@dataclass(frozen=True)
class Cell:
    """One scenario cell of a sweep: its own Optuna study, ASHA brackets and MLflow parent run."""

    index: int
    label_noise_rate: float
    label: str            # e.g. "noise=0.4": what the user reads and what MLflow tags carry

    @property
    def slug(self) -> str:
        """A directory-safe name, e.g. ``cell-1_noise-0.4``."""
        safe = "".join(c if c.isalnum() or c in ".-" else "-" for c in self.label)
        return f"cell-{self.index}_{safe}"


_SWEEP_SPECS: dict[str, Setting] = {
    "name": Setting("str", doc="experiment name (MLflow) and directory name (Ray)"),
    "dataset": TRIAL_SETTINGS["dataset"],
    "model": TRIAL_SETTINGS["model"],
    "epochs": TRIAL_KEYS["epochs"],
    "batch_size": TRIAL_KEYS["batch_size"],
    "trials": Setting("int", low=1, doc="trials per cell"),
    "scenario": TRIAL_KEYS["scenario"],
    "label_noise_kind": TRIAL_KEYS["label_noise_kind"],
    "workers": TRIAL_KEYS["workers"],
    "gpus_per_trial": Setting("float", low=0.0, doc="GPUs per trial (fractions pack trials onto a GPU)"),
    "cpus_per_trial": Setting("float", low=0.0, low_open=True, doc="CPUs per trial"),
    "metric": Setting("str", doc="per-epoch metric ASHA and TPE optimise"),
    "mode": choice("min", "max"),
    "seed": TRIAL_KEYS["seed"],
    "data_subset": TRIAL_KEYS["data_subset"],
    "max_concurrent": Setting("int", optional=True, low=1, doc="trials at once (None: what the cluster fits)"),
    "grace_period": Setting("int", optional=True, low=1, doc="ASHA: epochs before a trial may stop"),
    "reduction_factor": Setting("float", low=1.0, low_open=True, doc="ASHA: keep 1/this at each rung"),
    "sharpness_every": TRIAL_KEYS["sharpness_every"],
    "deterministic": Setting("bool", doc="search in batches, each decision a function of results alone "
                             "(False: asynchronous, decisions depend on timing)"),
    "search_batch": Setting("int", low=1, doc="deterministic search: trials of a cell suggested together, "
                            "from the results of every earlier batch"),
    "confirm_seeds": Setting("int", low=0, doc="fresh seeds each confirmed configuration runs on (0: none)"),
    "max_confirm_seeds": Setting("int", optional=True, low=1, doc="seeds a cell's picks may reach while "
                                 "its verdict is undecided (None: confirm_seeds, one round)"),
    "equivalence_margin": Setting("float", low=0.0, low_open=True, doc="SAM and SGD are equivalent when the "
                                  "interval of their difference lies within +/- this"),
    "vary_noise_draw": Setting("bool", doc="confirmation seeds also draw the label noise anew"),
}


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """A study: which cells, which model, what budget, what resources, what to optimise.

    Cells: one per entry of ``label_noise_rates`` (the finetune scenario uses them too: finetuning
    under that much noise). Per cell, ``trials`` Optuna trials of ``epochs`` epochs each; ASHA may
    stop a trial after ``grace_period`` epochs (None: a quarter of the epochs, at least 1).

    Resources: ``cpus_per_trial``/``gpus_per_trial`` is what one trial holds when ``workers == 1``;
    with ``workers > 1`` each Ray Train worker takes one CPU and, when ``gpus_per_trial > 0``, one
    GPU, so ``gpus_per_trial`` must then be 0 or equal to ``workers``.

    ``fixed`` adds settings to every trial config (any key of `TRIAL_KEYS` except the ones this
    class already sets). Construction validates everything and raises SpaceError (one line).

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

    def __post_init__(self) -> None:
        for key, spec in _SWEEP_SPECS.items():
            object.__setattr__(self, key, spec.validate(key, getattr(self, key)))
        if not _NAME_CHARS.fullmatch(self.name):
            raise SpaceError(f"name={self.name!r}: expected letters, digits, '.', '_', '-' and inner "
                             f"spaces, starting with a letter or digit, e.g. name='noisy-digits'")
        if len(self.name) > MAX_NAME:
            # It names folders and files (with suffixes), which file systems cap at 255 bytes.
            raise SpaceError(f"name={self.name[:20]}...: {len(self.name)} characters; at most {MAX_NAME}")
        object.__setattr__(self, "label_noise_rates", self._validated_rates(self.label_noise_rates))
        metrics = reported_metrics()
        if self.metric not in metrics and not self.metric.startswith("sharpness/"):
            raise SpaceError(f"metric={self.metric!r}: not a metric trials report; expected one of {list(metrics)} or "
                             f"'sharpness/<measure>'{suggest(self.metric, metrics)}")
        if self.batch_size % self.workers:
            raise SpaceError(f"batch_size={self.batch_size} is not divisible by workers={self.workers}")
        if self.workers > 1 and self.gpus_per_trial not in (0.0, float(self.workers)):
            raise SpaceError(f"gpus_per_trial={self.gpus_per_trial:g} with workers={self.workers}: each worker "
                             f"takes one whole GPU, so gpus_per_trial must be 0 or {self.workers}")
        if not isinstance(self.fixed, dict):
            raise SpaceError(f"fixed={self.fixed!r}: expected a dict of trial settings")
        for key in self.fixed:
            if not isinstance(key, str):
                raise SpaceError(f"fixed has a non-string key {key!r}")
            if key in SWEEP_FIELDS:
                raise SpaceError(f"fixed sets {key!r}, which Sweep sets itself; use Sweep({SWEEP_FIELDS[key]}=...)")
            if key in ("baseline", "confirms", "trial_number"):  # study keys fixed may not set (data_root, say, it may)
                if (error := study_key_error(key, f"fixed sets {key!r}")) is not None:
                    raise error
        fixed = validate_trial_config(dict(self.fixed), where="fixed: ", whole=False)
        object.__setattr__(self, "fixed", fixed)
        # The whole base config must hold together (e.g. a fixed m against the batch).
        validate_trial_config(self.base_config(self.cells()[0]), where="")
        self._validate_answer_fields()
        if self.max_confirm_seeds is not None and self.max_confirm_seeds < self.confirm_seeds:
            raise SpaceError(f"max_confirm_seeds={self.max_confirm_seeds} is below confirm_seeds="
                             f"{self.confirm_seeds}: the first round already runs that many seeds")
        check_metric_reported(self.metric, self.base_config(self.cells()[0]))

    def _validate_answer_fields(self) -> None:
        """The baselines, their declared settings and the m ablation: trial settings each."""
        if self.baselines is not None:
            if not isinstance(self.baselines, (list, tuple)) or not all(isinstance(b, dict) for b in self.baselines):
                raise SpaceError(f"baselines={self.baselines!r}: expected a tuple of dicts of trial settings, "
                                 "e.g. ({'optimizer': 'sgd'}, {'optimizer': 'sam', 'rho': 0.05})")
            object.__setattr__(self, "baselines", tuple(
                validate_trial_config(dict(b), where=f"baselines[{i}]: ", whole=False)
                for i, b in enumerate(self.baselines)))
        if not isinstance(self.baseline_params, dict):
            raise SpaceError(f"baseline_params={self.baseline_params!r}: expected a dict of trial settings")
        object.__setattr__(self, "baseline_params",
                           validate_trial_config(dict(self.baseline_params), where="baseline_params: ", whole=False))
        ms = (self.m_ablation,) if self.m_ablation is None or isinstance(self.m_ablation, int) else self.m_ablation
        if not isinstance(ms, (list, tuple)):
            raise SpaceError(f"m_ablation={self.m_ablation!r}: expected a tuple of m values (None: the whole "
                             "per-worker batch), e.g. (None, 32, 16, 8, 4)")
        object.__setattr__(self, "m_ablation", tuple(TRIAL_KEYS["m"].validate("m_ablation", m) for m in ms))
        if self.m_ablation_rates is not None:
            # A rate that is no cell (--set label_noise_rates left it out) ablates nothing.
            object.__setattr__(self, "m_ablation_rates", self._validated_rates(self.m_ablation_rates))

    def design(self) -> Design:
        """The verdicts' sequential design: a look after each round of confirmation seeds, from
        ``confirm_seeds`` to ``max_confirm_seeds``, and the equivalence margin."""
        last = self.max_confirm_seeds if self.max_confirm_seeds is not None else self.confirm_seeds
        return Design(looks=looks_between(self.confirm_seeds, last), margin=self.equivalence_margin)

    def ablation_ms(self, cell: Cell | None = None) -> tuple[int | None, ...]:
        """The m values of the m ablation (of ``cell``: none outside ``m_ablation_rates``) that
        divide the per-worker batch (None: the whole batch). It runs on the confirmation seeds,
        so not at all with ``confirm_seeds=0``."""
        if not self.confirm_seeds or (cell is not None and self.m_ablation_rates is not None
                                      and cell.label_noise_rate not in self.m_ablation_rates):
            return ()
        local = self.batch_size // self.workers
        return tuple(m for m in self.m_ablation if m is None or local % m == 0)

    @staticmethod
    def _validated_rates(rates: Any) -> tuple[float, ...]:
        if isinstance(rates, (int, float)) and not isinstance(rates, bool):
            rates = (rates,)
        if not isinstance(rates, (list, tuple)):
            raise SpaceError(f"label_noise_rates={rates!r}: expected a tuple of rates in [0, 1)")
        if not rates:
            raise SpaceError("label_noise_rates is empty: expected at least one rate in [0, 1)")
        out = tuple(TRIAL_KEYS["label_noise_rate"].validate("label noise rate", r) for r in rates)
        if len(set(out)) != len(out):
            raise SpaceError(f"label_noise_rates={list(rates)} repeats a rate")
        # Cells are named, and found again on --resume, by the rate to 6 significant digits
        # (`cells`): two rates that differ only beyond that would be one cell counted twice.
        shown = [f"{r:g}" for r in out]
        twins = sorted({label for label in shown if shown.count(label) > 1})
        if twins:
            raise SpaceError(f"label_noise_rates={list(rates)}: {', '.join(repr(r) for r in out if f'{r:g}' in twins)} "
                             f"are all the cell noise={twins[0]} (rates count to 6 significant digits); "
                             "give each rate once")
        return out

    def cells(self) -> list[Cell]:
        """The scenario cells, in the order given."""
        suffix = "" if self.label_noise_kind == "symmetric" else f" {self.label_noise_kind}"
        return [Cell(i, r, f"noise={r:g}{suffix}") for i, r in enumerate(self.label_noise_rates)]

    def cell(self, rate: float | str) -> Cell:
        """The cell for a noise rate (``0.4`` or ``"0.4"`` or ``"noise=0.4"``); SpaceError if absent."""
        text = str(rate).strip().removeprefix("noise=")
        try:
            value = float(text)
        except ValueError:
            raise SpaceError(f"--cell {rate!r}: expected a label-noise rate such as 0.4") from None
        for cell in self.cells():
            if math.isclose(cell.label_noise_rate, value, abs_tol=1e-12):
                return cell
        raise SpaceError(f"--cell {rate}: this sweep has no such cell; its rates are "
                         f"{', '.join(f'{r:g}' for r in self.label_noise_rates)}")

    def base_config(self, cell: Cell) -> dict[str, Any]:
        """The trial config every trial of ``cell`` starts from (space values are added on top)."""
        config: dict[str, Any] = {
            "dataset": self.dataset,
            "model": self.model,
            "scenario": self.scenario,
            "label_noise_rate": cell.label_noise_rate,
            "label_noise_kind": self.label_noise_kind,
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


REQUIRED = tuple(f.name for f in dataclasses.fields(Sweep)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


def unknown_sweep_key(key: str) -> str:
    return (f"Sweep has no setting {key!r}{suggest(key, _FIELD_NAMES)}; "
            f"settings: {', '.join(_FIELD_NAMES)} (trial settings go in fixed={{...}})")


def parse_assignments(text: str | Sequence[str], what: str = "--set") -> list[tuple[str, str]]:
    """Split ``"a=1,b=2"`` (or a list of ``"k=v"``) into ``[(key, raw_value)]``; SpaceError if malformed."""
    items = [p for p in (text.split(",") if isinstance(text, str) else text)]
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpaceError(f"{what} expects key=value, got {item!r}")
        out.append((key, raw.strip()))
    return out


def _parse_rates(key: str, raw: str) -> tuple[float, ...]:
    text = raw.strip().strip("[]()")
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise SpaceError(f"{key}={raw}: expected comma-separated rates, e.g. 0.0,0.4") from None


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
                changes[key] = _parse_rates(key, raw)
            elif key == "m_ablation_rates":
                changes[key] = _parse_rates(key, raw)
            elif key == "m_ablation":
                changes[key] = tuple(parse_trial_value("m", part.strip()) for part in raw.split(",") if part.strip())
            elif key == "fixed":
                raise SpaceError("--set fixed=...: set one trial setting at a time, e.g. --set fixed.weight_decay=1e-4")
            elif key in _SWEEP_SPECS:
                changes[key] = _SWEEP_SPECS[key].parse(key, raw)
            else:
                hint = f"; for a trial setting use --set fixed.{key}=..." if key in TRIAL_KEYS else ""
                raise SpaceError(f"--set: {unknown_sweep_key(key)}{hint}")
    if fixed != sweep.fixed:
        changes["fixed"] = fixed
    try:
        return sweep.replace(**changes) if changes else sweep
    except SpaceError as exc:
        raise SpaceError(f"--set: {exc}") from None

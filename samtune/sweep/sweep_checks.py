"""What makes a `Sweep` valid: each setting's type and range (`SWEEP_SPECS`), a name that can
name an experiment, a folder and run keys, distinct cell rates, a metric trials report, workers
that divide the batch, and fixed, baseline and ablation settings that are trial settings; and
which keys the study sets itself, so a space or ``fixed`` may not (`study_key_error`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from samtune.contract.keys import STUDY_KEYS, SWEEP_FIELDS, TRIAL_KEYS
from samtune.contract.metrics import reported_metrics
from samtune.contract.values import Setting, SpaceError, choice, suggest
from samtune.data.human_noise import HUMAN_LABEL_FILES
from samtune.sweep.ablations import normalised
from samtune.sweep.validate import TRIAL_SETTINGS, check_metric_reported, validate_trial_config

if TYPE_CHECKING:
    from samtune.sweep.study import Sweep


def study_key_error(key: str, what: str) -> SpaceError | None:
    """The error for `what` (e.g. "space suggests 'epochs'") touching a key the study sets, with
    where it is set instead; None for a key anyone may set."""
    if key == "baseline":
        return SpaceError(
            f"{what}, which the sweep sets per trial (a cell's first SGD and SAM trials are its baselines)"
        )
    if key == "confirms":
        return SpaceError(f"{what}, which the sweep sets on its confirmation runs")
    if key == "trial_number":
        return SpaceError(f"{what}, which the sweep sets per trial (its place in its cell's search)")
    if key in STUDY_KEYS:
        owner = SWEEP_FIELDS.get(key, key)
        return SpaceError(
            f"{what}, which the Sweep fixes per cell; use --set {owner}=... (or Sweep({owner}=...) in the file)"
        )
    return None


#: What a sweep name may hold: it names the MLflow experiment, a folder and the runs' keys, and a
#: quote or a slash would break one of them.
NAME_CHARS = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._ -]*[A-Za-z0-9._-])?")


MAX_NAME = 100  # characters of a sweep name


SWEEP_SPECS: dict[str, Setting] = {
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
    "deterministic": Setting(
        "bool",
        doc="search in batches, each decision a function of results alone "
        "(False: asynchronous, decisions depend on timing)",
    ),
    "search_batch": Setting(
        "int",
        low=1,
        doc="deterministic search: trials of a cell suggested together, from the results of every earlier batch",
    ),
    "confirm_seeds": Setting("int", low=0, doc="fresh seeds each confirmed configuration runs on (0: none)"),
    "max_confirm_seeds": Setting(
        "int",
        optional=True,
        low=1,
        doc="seeds a cell's picks may reach while its verdict is undecided (None: confirm_seeds, one round)",
    ),
    "equivalence_margin": Setting(
        "float",
        low=0.0,
        low_open=True,
        doc="SAM and SGD are equivalent when the interval of their difference lies within +/- this",
    ),
    "vary_noise_draw": Setting("bool", doc="confirmation seeds also draw the label noise anew"),
    "human_noise_twins": Setting("bool", doc="beside each human noise cell, its synthetic twin's"),
}


def check_sweep(sweep: Sweep) -> None:
    """Validate every field of `sweep` in place (normalised values are set on it); SpaceError
    (one line) names the first that is wrong."""
    for key, spec in SWEEP_SPECS.items():
        object.__setattr__(sweep, key, spec.validate(key, getattr(sweep, key)))
    if not NAME_CHARS.fullmatch(sweep.name):
        raise SpaceError(
            f"name={sweep.name!r}: expected letters, digits, '.', '_', '-' and inner "
            f"spaces, starting with a letter or digit, e.g. name='noisy-digits'"
        )
    if len(sweep.name) > MAX_NAME:
        # It names folders and files (with suffixes), which file systems cap at 255 bytes.
        raise SpaceError(f"name={sweep.name[:20]}...: {len(sweep.name)} characters; at most {MAX_NAME}")
    check_human_noise(sweep)
    metrics = reported_metrics()
    if sweep.metric not in metrics and not sweep.metric.startswith("sharpness/"):
        raise SpaceError(
            f"metric={sweep.metric!r}: not a metric trials report; expected one of {list(metrics)} or "
            f"'sharpness/<measure>'{suggest(sweep.metric, metrics)}"
        )
    if sweep.batch_size % sweep.workers:
        raise SpaceError(f"batch_size={sweep.batch_size} is not divisible by workers={sweep.workers}")
    if sweep.workers > 1 and sweep.gpus_per_trial not in (0.0, float(sweep.workers)):
        raise SpaceError(
            f"gpus_per_trial={sweep.gpus_per_trial:g} with workers={sweep.workers}: each worker "
            f"takes one whole GPU, so gpus_per_trial must be 0 or {sweep.workers}"
        )
    if not isinstance(sweep.fixed, dict):
        raise SpaceError(f"fixed={sweep.fixed!r}: expected a dict of trial settings")
    for key in sweep.fixed:
        if not isinstance(key, str):
            raise SpaceError(f"fixed has a non-string key {key!r}")
        if key in SWEEP_FIELDS:
            raise SpaceError(f"fixed sets {key!r}, which Sweep sets itself; use Sweep({SWEEP_FIELDS[key]}=...)")
        if key in ("baseline", "confirms", "trial_number"):  # study keys fixed may not set (data_root, say, it may)
            if (error := study_key_error(key, f"fixed sets {key!r}")) is not None:
                raise error
    fixed = validate_trial_config(dict(sweep.fixed), where="fixed: ", whole=False)
    object.__setattr__(sweep, "fixed", fixed)
    # The whole base config must hold together (e.g. a fixed m against the batch).
    validate_trial_config(sweep.base_config(sweep.cells()[0]), where="")
    check_answer_fields(sweep)
    if sweep.max_confirm_seeds is not None and sweep.max_confirm_seeds < sweep.confirm_seeds:
        raise SpaceError(
            f"max_confirm_seeds={sweep.max_confirm_seeds} is below confirm_seeds="
            f"{sweep.confirm_seeds}: the first round already runs that many seeds"
        )
    check_metric_reported(sweep.metric, sweep.base_config(sweep.cells()[0]))


def check_human_noise(sweep: Sweep) -> None:
    """The cells' rates and human label sets: distinct rates (none needed beside human noise) and
    sets of the sweep's dataset, which must be that dataset whole."""
    sets = (sweep.human_noise,) if isinstance(sweep.human_noise, str) else sweep.human_noise
    if not isinstance(sets, (list, tuple)) or not all(isinstance(s, str) for s in sets):
        raise SpaceError(f"human_noise={sweep.human_noise!r}: expected a tuple of label sets, e.g. ('aggre', 'worst')")
    sets = tuple(s.strip().removeprefix("human:") for s in sets)
    if sets:
        spec = HUMAN_LABEL_FILES.get(sweep.dataset.strip().lower())
        if spec is None:
            raise SpaceError(
                f"human_noise={list(sets)}: human labels exist for {sorted(HUMAN_LABEL_FILES)} (whole, no class "
                f"selection), not for dataset {sweep.dataset!r}"
            )
        unknown = [s for s in sets if s not in spec.sets]
        if unknown or len(set(sets)) != len(sets):
            raise SpaceError(
                f"human_noise={list(sets)}: {spec.title} has the label sets {list(spec.sets)}, each at most once"
            )
    object.__setattr__(sweep, "human_noise", sets)
    rates = sweep.label_noise_rates
    empty = isinstance(rates, (list, tuple)) and not rates
    object.__setattr__(sweep, "label_noise_rates", () if empty and sets else validated_rates(rates))


def check_answer_fields(sweep: Sweep) -> None:
    """The baselines, their declared settings and the ablations: trial settings each."""
    if sweep.baselines is not None:
        if not isinstance(sweep.baselines, (list, tuple)) or not all(isinstance(b, dict) for b in sweep.baselines):
            raise SpaceError(
                f"baselines={sweep.baselines!r}: expected a tuple of dicts of trial settings, "
                "e.g. ({'optimizer': 'sgd'}, {'optimizer': 'sam', 'rho': 0.05})"
            )
        object.__setattr__(
            sweep,
            "baselines",
            tuple(
                validate_trial_config(dict(b), where=f"baselines[{i}]: ", whole=False)
                for i, b in enumerate(sweep.baselines)
            ),
        )
    if not isinstance(sweep.baseline_params, dict):
        raise SpaceError(f"baseline_params={sweep.baseline_params!r}: expected a dict of trial settings")
    object.__setattr__(
        sweep,
        "baseline_params",
        validate_trial_config(dict(sweep.baseline_params), where="baseline_params: ", whole=False),
    )
    ms = (sweep.m_ablation,) if sweep.m_ablation is None or isinstance(sweep.m_ablation, int) else sweep.m_ablation
    if not isinstance(ms, (list, tuple)):
        raise SpaceError(
            f"m_ablation={sweep.m_ablation!r}: expected a tuple of m values (None: the whole "
            "per-worker batch), e.g. (None, 32, 16, 8, 4)"
        )
    object.__setattr__(sweep, "m_ablation", tuple(TRIAL_KEYS["m"].validate("m_ablation", m) for m in ms))
    if sweep.m_ablation_rates is not None:
        # A rate that is no cell (--set label_noise_rates left it out) ablates nothing.
        object.__setattr__(sweep, "m_ablation_rates", validated_rates(sweep.m_ablation_rates))
    normalised(sweep.ablations, sweep.m_ablation)  # both spellings of m at once is a mistake
    object.__setattr__(sweep, "ablations", normalised(sweep.ablations))
    if sweep.ablation_rates is not None:
        object.__setattr__(sweep, "ablation_rates", validated_rates(sweep.ablation_rates))


def validated_rates(rates: Any) -> tuple[float, ...]:
    """`rates` (one rate, or a tuple of them) as the tuple of distinct cell rates, each in [0, 1)."""
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
        raise SpaceError(
            f"label_noise_rates={list(rates)}: {', '.join(repr(r) for r in out if f'{r:g}' in twins)} "
            f"are all the cell noise={twins[0]} (rates count to 6 significant digits); "
            "give each rate once"
        )
    return out

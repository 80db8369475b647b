"""Checking trial configs, the one flat dict per trial that `samtune.trial.entry.fit` consumes.

Every key and value is checked against `samtune.contract.keys.TRIAL_KEYS`, with the dataset and
model names checked against what the data and model layers read (`TRIAL_SETTINGS`); the rules
between keys by the trainer's own `samtune.trial.config.resolve_config`; and whether trials would
report, every epoch, the metric a sweep optimises (`check_metric_reported`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from samtune.contract.keys import DEFAULT_MEASURES, TRIAL_KEYS
from samtune.contract.messages import first_line
from samtune.contract.values import Setting, SpaceError, suggest
from samtune.data.dataset import DATASETS
from samtune.data.load import parse_dataset_name
from samtune.models.zoo import MODELS, check_torchvision_arch
from samtune.trial.config import TrialConfigError, resolve_config


def _check_dataset(key: str, value: str) -> None:
    """Every name the data layer reads (`samtune.data.load.parse_dataset_name`): a dataset,
    optionally with a class selection such as ``digits[0-4]``. The indices are checked against the
    dataset where it is read, before any trial (`samtune.sweep.preflight`)."""
    try:
        base, _ = parse_dataset_name(value)
    except ValueError as exc:
        raise SpaceError(f"{key}: {exc}") from None
    if base in DATASETS:
        return
    if base.startswith("imagefolder:"):
        if not base.split(":", 1)[1].strip():
            raise SpaceError(f"{key}='imagefolder:' needs a path, e.g. 'imagefolder:/data/pets'")
        return
    raise SpaceError(
        f"unknown {key} {value!r}; expected one of {list(DATASETS)} or 'imagefolder:<path>', "
        f"optionally with a class selection such as [0-4]" + suggest(base, DATASETS)
    )


def _check_model(key: str, value: str) -> None:
    if value.startswith("torchvision:"):
        if not value.split(":", 1)[1].strip():
            raise SpaceError(f"{key}='torchvision:' needs an architecture, e.g. 'torchvision:resnet18'")
        try:
            check_torchvision_arch(value.split(":", 1)[1].strip())
        except ValueError as exc:
            raise SpaceError(f"{key}={value!r}: {exc}") from None
        return
    models = sorted(MODELS)
    if value not in models:
        raise SpaceError(
            f"unknown {key} {value!r}; expected one of {list(models)} or 'torchvision:<name>'" + suggest(value, models)
        )


def check_metric_reported(metric: str, config: dict[str, Any], where: str = "") -> None:
    """Raise SpaceError when trials run with ``config`` would not report ``metric`` every epoch.

    ASHA compares trials at every rung and Tune rejects a result without the metric, so a metric
    that is missing from some epochs fails every trial instead of guiding the search.
    """
    if metric in ("val_error", "val_loss") and config.get("val_fraction") == 0:
        raise SpaceError(
            f"{where}metric={metric!r} with val_fraction=0: there is no validation split, so "
            f"no trial reports {metric}; set fixed.val_fraction > 0 or metric="
            f"{metric.replace('val_', 'test_')!r}"
        )
    train_every = config.get("train_eval_every", 1)
    if metric in ("train_error", "generalization_gap", "flipped_acc_noisy", "flipped_acc_true") and train_every != 1:
        raise SpaceError(
            f"{where}metric={metric!r} is measured only "
            f"{'at the last epoch' if train_every == 0 else f'every {train_every} epochs'} "
            f"(train_eval_every={train_every}), but ASHA needs it every epoch; "
            f"set train_eval_every=1 or optimise val_error"
        )
    if not metric.startswith("sharpness/"):
        return
    every = config.get("sharpness_every") or 0
    if every != 1:
        raise SpaceError(
            f"{where}metric={metric!r} is measured only "
            f"{'at the last epoch' if every == 0 else f'every {every} epochs'} "
            f"(sharpness_every={every}), but ASHA needs it every epoch; "
            f"set sharpness_every=1 or optimise val_error"
        )
    measures = config.get("sharpness_measures")
    # The trainer's reading of the setting: None or "default" is its default list, "" none.
    if measures is None or measures == "default":
        measures = DEFAULT_MEASURES
    if isinstance(measures, str):
        measures = measures.split(",")
    measures = {str(m).strip() for m in measures} - {""}
    name = metric.split("/")[1]
    # ``hessian_top_eig_2`` is the second eigenvalue of the ``hessian_top_eig`` measure.
    if name not in measures and re.sub(r"_\d+$", "", name) not in measures:
        raise SpaceError(
            f"{where}metric={metric!r}: {name!r} is not among the measured sharpness_measures "
            f"{sorted(measures) or '(none)'}; add it to fixed.sharpness_measures"
        )


#: The trial keys as the sweep checks them: the contract's, with the dataset and model names
#: checked against what the data and model layers read.
TRIAL_SETTINGS: dict[str, Setting] = {
    **TRIAL_KEYS,
    "dataset": dataclasses.replace(TRIAL_KEYS["dataset"], check=_check_dataset),
    "model": dataclasses.replace(TRIAL_KEYS["model"], check=_check_model),
}


def trial_spec(key: str, where: str) -> Setting:
    if key not in TRIAL_SETTINGS:
        raise SpaceError(
            f"{where}unknown trial setting {key!r}{suggest(key, TRIAL_SETTINGS)}; "
            f"known: {', '.join(sorted(TRIAL_SETTINGS))}"
        )
    return TRIAL_SETTINGS[key]


def parse_trial_value(key: str, raw: str) -> Any:
    """Parse ``raw`` (command-line text) for trial setting ``key``; SpaceError if unknown or bad."""
    return trial_spec(key, "").parse(key, raw)


def validate_trial_config(config: dict[str, Any], where: str = "", whole: bool = True) -> dict[str, Any]:
    """Check a trial config: every key known, every value of the right type and range, and (with
    ``whole``) the rules between keys, by the trainer's own `resolve_config`: the batch divisible
    by the workers, ``m`` dividing the per-worker batch (or a multiple of it across workers), the
    SAM variant's knobs, ``fp16`` only on GPUs.

    ``whole=False`` checks keys one by one (a partial config such as ``Sweep.fixed``). Returns a
    normalised copy. Raises SpaceError naming the first problem, prefixed by ``where``.

    >>> validate_trial_config({"rho": 0.1, "lr": 0.05}, whole=False)
    {'rho': 0.1, 'lr': 0.05}
    >>> validate_trial_config({"rho": -1.0}, where="fixed: ", whole=False)
    Traceback (most recent call last):
    samtune.contract.values.SpaceError: fixed: rho=-1.0: expected a number >= 0
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        spec = trial_spec(key, where)
        try:
            out[key] = spec.validate(key, value)
        except SpaceError as exc:
            raise SpaceError(f"{where}{exc}") from None
    if whole:
        try:
            resolve_config(out)
        except (TrialConfigError, ValueError) as exc:
            raise SpaceError(f"{where}{first_line(exc)}") from None
    return out

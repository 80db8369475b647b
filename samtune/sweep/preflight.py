"""What every trial of a sweep would reject, found in the driver before any compute is spent.

A sweep's space is checked value by value on sampled trials (`samtune.sweep.check.check_space`);
this adds what only the dataset's shape decides: a batch larger than a cell's training split,
label noise on a dataset of one class, human label files that are missing, not the published
ones or not in the order of this copy's images. The dataset is read once here (from its cache: a fraction
of a second), and each cell's split sized without building it
(`samtune.data.scenarios.split_sizes`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from samtune.contract.messages import first_line
from samtune.data.dataset import Dataset
from samtune.data.human_noise import is_human_kind
from samtune.data.load import load_dataset
from samtune.data.scenarios import human_labels, split_sizes
from samtune.sweep.study import Sweep
from samtune.trial.config import TrialConfigError, perturbation_plan, resolve_config


class PreflightError(ValueError):
    """A sweep whose trials would fail on its dataset."""


def check_cells(sweep: Sweep, sampled: Iterable[dict[str, Any]] = ()) -> None:
    """Raise PreflightError naming the dataset, or the first cell, whose trials could not train;
    DataNotFoundError when the dataset is not on this machine.

    `sampled`: parameter sets the space produced (`check_space`); the batch size and worker
    count may come from there, so each is sized against every cell.
    """
    try:
        dataset = load_dataset(sweep.dataset, sweep.fixed.get("data_root"))
    except ValueError as exc:  # a class selection the dataset does not have, unreadable files
        raise PreflightError(f"dataset {sweep.dataset!r}: {exc}") from None
    variants = [dict(p) for p in sampled] or [{}]
    _check_models_fit(sweep, dataset.input_shape, variants)
    check_human_labels(sweep, dataset)
    for cell in sweep.cells():
        for params in variants:
            config = {**sweep.base_config(cell), **params}
            try:
                cfg = resolve_config(config)
                sizes = split_sizes(len(dataset.train_y), dataset.num_classes, cfg)
            except (TrialConfigError, ValueError) as exc:
                raise PreflightError(f"cell {cell.label}: {exc}") from None
            plan = perturbation_plan(cfg)
            per_worker = sizes.train // cfg["workers"]
            if per_worker < plan.per_worker_batch:
                raise PreflightError(
                    f"cell {cell.label}: batch_size={cfg['batch_size']} is larger than the {sizes.train} training "
                    f"examples {sweep.dataset!r} leaves after its validation split"
                    + (f" ({per_worker} per worker)" if cfg["workers"] > 1 else "")
                    + "; lower batch_size or val_fraction"
                )


def check_human_labels(sweep: Sweep, dataset: Dataset) -> None:
    """Each human noise cell's labels: the file found, its digest the published one, and its order
    matched to this copy's images (`samtune.data.human_noise`), before any trial."""
    for cell in sweep.cells():
        if not is_human_kind(cell.label_noise_kind):
            continue
        try:
            human_labels(dataset, sweep.base_config(cell), sweep.seed)
        except ValueError as exc:  # a missing file is a DataNotFoundError, reported as missing data
            raise PreflightError(f"cell {cell.label}: {first_line(exc)}") from None


def _check_models_fit(sweep: Sweep, input_shape: tuple[int, int, int], variants: list[dict[str, Any]]) -> None:
    """torchvision's classifiers take 3-channel images: on a grey dataset every trial would fail
    building its model."""
    base = sweep.base_config(sweep.cells()[0])
    models = {str({**base, **p}["model"]) for p in variants}
    for model in sorted(models):
        if model.startswith("torchvision:") and input_shape[0] != 3:
            raise PreflightError(
                f"model {model!r} expects 3-channel images, but dataset {sweep.dataset!r} has "
                f"{input_shape[0]} channel(s); choose a model of the zoo (e.g. 'cnn')"
            )

"""Scenarios: what a trial trains on (data, splits, label noise) and where its weights start.

A scenario turns a flat trial config into a `Scenario`: tensors already split, noisy where the
study says so, with the normalisation and the starting weights that go with them.

``label_noise`` (default): a fraction of the training labels is flipped
(`samtune.data.noise`: symmetric, pairflip or CIFAR-10's asymmetric map), or the training labels
are CIFAR-10N/CIFAR-100N's human ones (``human:<set>``) or synthetic noise of their transition
matrix (``twin:<set>``), both at the file's measured rate (`samtune.data.human_noise`). The validation split
is drawn from the noisy training set (model selection sees only what a user with noisy data
would see); the test set stays clean. The scenario keeps which examples flipped
(``train_flipped``, ``val_flipped``) and the clean validation labels (``val_y_true``).

``finetune``: the same data pipeline (subset, label noise, validation split) on the target
``dataset``, but the model starts from pretrained weights (SAM paper, section 3.2).
``finetune_source`` (required) names them: a weights file, ``torchvision:<Weights>`` from the
local torch hub cache or an MLflow URI, read by `samtune.models.weights`; or a dataset to
pretrain on (e.g. ``cifar100``, or ``cifar10[0-4]`` for a target of ``cifar10[5-9]``), which
the trial pretrains first (`samtune.trial.pretrain`) and passes in as ``initial_state``.
Everything but the classification head is loaded; the head is new, sized for the target's
classes. ``freeze_bn`` keeps BatchNorm running statistics at their pretrained values (the SAM
paper's finetuning runs did); ``backbone_lr_scale`` is the learning-rate multiplier for the
pretrained layers: the trainer's optimizer holds the head at ``lr`` and every other parameter
at ``lr * backbone_lr_scale`` (`samtune.models.heads.param_groups`).

The keys read are the data and scenario keys of `samtune.contract.keys` (defaults there). The
subset is drawn before the validation split, and ``data_seed`` (default: ``seed``) fixes the
subset, the noise and the split: set it apart from ``seed`` to vary model initialisation over
one fixed noisy dataset. ``augment`` unset: on for images of 32x32 and larger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from samtune.contract.keys import SCENARIOS
from samtune.data.dataset import Dataset
from samtune.data.human_noise import HUMAN_NOISE_RATES, is_human_kind, kind_title, noisy_train_labels
from samtune.data.load import load_dataset
from samtune.data.noise import apply_label_noise, asymmetric_class_map
from samtune.models.heads import freeze_batchnorm_stats
from samtune.models.weights import load_backbone, load_source
from samtune.models.zoo import build_model as _build_model

# Fixed offsets mixed into the data seed so the subset, the noise and the validation split draw
# independent streams from one seed.
_SUBSET_STREAM, _NOISE_STREAM, _VAL_STREAM, _TEST_STREAM = 101, 202, 303, 404


@dataclass
class Scenario:
    """Everything a trial needs, split and on CPU.

    ``train_y`` holds the (possibly noisy) labels trained on, ``train_y_true`` the clean ones;
    ``val_*`` comes from the noisy training set (``val_y`` noisy, ``val_y_true`` clean), ``test_*``
    is clean. ``train_flipped``/``val_flipped`` are the indices (int64, ascending, into the train
    and validation split) whose label the noise changed: ``train_y[i] != train_y_true[i]`` exactly
    there. Images are uint8; normalise with ``samtune.data.to_float(x, mean, std)``.
    """

    name: str
    cell: str
    train_x: Tensor
    train_y: Tensor
    train_y_true: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    initial_state: dict[str, Tensor] | None = None
    classes: list[str] = field(default_factory=list)
    freeze_bn: bool = False
    backbone_lr_scale: float = 1.0
    source: str | None = None  # finetune_source, for messages and records
    val_y_true: Tensor | None = None
    train_flipped: Tensor | None = None
    val_flipped: Tensor | None = None

    def build_model(self, model: str, norm: str = "batch") -> nn.Module:
        """Build ``model`` for this scenario's classes and input shape, starting weights loaded.

        With ``initial_state`` (finetuning), every tensor but the classification head comes from it
        and the head is freshly initialised for ``num_classes``; with ``freeze_bn`` the BatchNorm
        running statistics are frozen (`samtune.models.freeze_batchnorm_stats`). Raises
        ValueError when the weights do not fit ``model``/``norm``/``input_shape``.
        """
        net = _build_model(model, self.num_classes, self.input_shape, norm)
        if self.initial_state is not None:
            load_backbone(net, self.initial_state, source=self.source or "finetune_source")
        if self.freeze_bn:
            freeze_batchnorm_stats(net)
        return net


def _subset_indices(n: int, size: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:size].sort().values


def _cell_label(config: dict[str, Any]) -> str:
    rate = float(config.get("label_noise_rate", 0.0) or 0.0)
    kind = config.get("label_noise_kind", "symmetric")
    if is_human_kind(kind):
        return kind_title(kind)
    return f"noise={rate:g}" if kind == "symmetric" else f"noise={rate:g} {kind}"


def build_scenario(config: dict[str, Any], initial_state: dict[str, Tensor] | None = None) -> Scenario:
    """Build the trial's data (and starting weights) from a trial config; keys in the module doc.

    ``initial_state`` is the finetune scenario's starting weights when the caller has them already
    (the trainer pretrains a dataset-named ``finetune_source`` first, `samtune.trial.pretrain`);
    without it they are read from ``finetune_source``.

    Raises ValueError for an unknown scenario or out-of-range values (``val_fraction`` not in
    [0, 1), ``data_subset`` not positive) and a finetune scenario without ``finetune_source``,
    and whatever ``load_dataset`` (missing data) or `samtune.models.weights.load_source`
    (missing or unreadable weights) raises.

    >>> scenario = build_scenario({"dataset": "digits", "data_subset": 500, "label_noise_rate": 0.2})
    >>> len(scenario.train_y), len(scenario.val_y), scenario.num_classes, scenario.input_shape
    (450, 50, 10, (1, 8, 8))
    >>> len(scenario.train_flipped) + len(scenario.val_flipped)  # 20% of 500 labels
    100
    >>> bool((scenario.train_y[scenario.train_flipped] != scenario.train_y_true[scenario.train_flipped]).all())
    True
    """
    kind = config.get("scenario", "label_noise") or "label_noise"
    if kind not in SCENARIOS:
        raise ValueError(f"unknown scenario {kind!r}; expected one of {SCENARIOS}")
    if "dataset" not in config:
        raise ValueError("trial config needs a 'dataset' (e.g. 'digits', 'cifar10')")
    dataset = load_dataset(config["dataset"], config.get("data_root"))
    scenario = _split(dataset, config, name=kind, cell=_cell_label(config))
    if kind == "finetune":
        _add_pretrained(scenario, config, initial_state)
    return scenario


def _add_pretrained(scenario: Scenario, config: dict[str, Any], state: dict[str, Tensor] | None) -> None:
    """Fill in the finetuning fields: starting weights, frozen BN, backbone learning-rate scale."""
    source = config.get("finetune_source")
    if not source:
        raise ValueError(
            "scenario 'finetune' needs finetune_source: a weights file, a dataset to pretrain "
            "on (e.g. 'cifar100' or 'cifar10[0-4]'), 'torchvision:<Weights>' or an MLflow URI"
        )
    scale = 1.0 if config.get("backbone_lr_scale") is None else float(config["backbone_lr_scale"])
    if not scale >= 0.0:
        raise ValueError(f"backbone_lr_scale must be >= 0, got {config['backbone_lr_scale']!r}")
    scenario.initial_state = state if state is not None else load_source(str(source))
    scenario.source = str(source)
    scenario.freeze_bn = bool(config.get("freeze_bn", False))
    scenario.backbone_lr_scale = scale


@dataclass(frozen=True)
class SplitSizes:
    """How many examples a trial's split holds, known from the dataset's size alone."""

    train: int
    val: int


def split_sizes(num_train: int, num_classes: int, config: dict[str, Any]) -> SplitSizes:
    """The sizes `build_scenario` gives a dataset of `num_train` training examples, without
    building it (a driver checks a sweep's cells with this before any trial). Raises ValueError
    as `build_scenario` would: `val_fraction` or `data_subset` out of range, no training example
    left, or label noise on fewer than 2 classes."""
    val_fraction = 0.1 if config.get("val_fraction") is None else float(config["val_fraction"])
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = num_train
    subset = config.get("data_subset")
    if subset is not None:
        if int(subset) < 1:
            raise ValueError(f"data_subset must be a positive number of training examples, got {subset}")
        n = min(n, int(subset))
    if float(config.get("label_noise_rate", 0.0) or 0.0) > 0 and num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    n_val = round(val_fraction * n)
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} leaves no training examples out of {n}")
    return SplitSizes(train=n - n_val, val=n_val)


def _split(dataset: Dataset, config: dict[str, Any], name: str, cell: str) -> Scenario:
    """Subset -> label noise -> validation split, all seeded by the data seed."""
    seed = int(config.get("seed", 0) or 0)
    data_seed = seed if config.get("data_seed") is None else int(config["data_seed"])
    sizes = split_sizes(len(dataset.train_y), dataset.num_classes, config)
    x, y, test_x, test_y, chosen = _subsets(dataset, config, data_seed)
    noisy, is_flipped = _noisy_labels(dataset, config, y, data_seed, chosen)

    n_val = sizes.val
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed * 1000 + _VAL_STREAM))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values

    augment = config.get("augment")
    if augment is None:
        # Crop+flip is the CIFAR convention; on 8x8 digits a 4-pixel shift or a mirror changes
        # the digit, so small images train without it unless asked.
        augment = min(dataset.input_shape[1:]) >= 32
    return Scenario(
        name=name,
        cell=cell,
        train_x=x[train_idx].contiguous(),
        train_y=noisy[train_idx].contiguous(),
        train_y_true=y[train_idx].contiguous(),
        val_x=x[val_idx].contiguous(),
        val_y=noisy[val_idx].contiguous(),
        val_y_true=y[val_idx].contiguous(),
        train_flipped=is_flipped[train_idx].nonzero().flatten(),
        val_flipped=is_flipped[val_idx].nonzero().flatten(),
        test_x=test_x.contiguous(),
        test_y=test_y.contiguous(),
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        mean=dataset.mean,
        std=dataset.std,
        augment=bool(augment),
        initial_state=None,
        classes=list(dataset.classes),
    )


def _subsets(
    dataset: Dataset, config: dict[str, Any], data_seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The training and test examples a trial uses: ``data_subset`` and ``test_subset`` drawn at
    random (in their original order), or all of them; last, the training subset's indices (None:
    all)."""
    x, y = dataset.train_x, dataset.train_y
    subset = config.get("data_subset")
    idx = None
    if subset is not None:
        subset = int(subset)
        if subset < len(y):
            idx = _subset_indices(len(y), subset, data_seed * 1000 + _SUBSET_STREAM)
            x, y = x[idx], y[idx]
    test_x, test_y = dataset.test_x, dataset.test_y
    test_subset = config.get("test_subset")
    if test_subset is not None and int(test_subset) < len(test_y):
        if int(test_subset) < 1:
            raise ValueError(f"test_subset must be positive, got {test_subset}")
        test_idx = _subset_indices(len(test_y), int(test_subset), data_seed * 1000 + _TEST_STREAM)
        test_x, test_y = test_x[test_idx], test_y[test_idx]
    return x, y, test_x, test_y, idx


def _noisy_labels(
    dataset: Dataset, config: dict[str, Any], y: Tensor, data_seed: int, chosen: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The labels trained on, and a mask of the examples whose label the noise changed.
    ``chosen``: the training subset's indices into the dataset (None: all of it)."""
    rate = float(config.get("label_noise_rate", 0.0) or 0.0)
    noise_kind = config.get("label_noise_kind", "symmetric") or "symmetric"
    if is_human_kind(noise_kind):
        noisy = human_labels(dataset, config, data_seed)
        noisy = noisy if chosen is None else noisy[chosen]
        return noisy, noisy != y
    class_map = None
    if noise_kind == "asymmetric":
        class_map = asymmetric_class_map(str(config.get("dataset", dataset.name)), list(dataset.classes))
    noisy, flipped = apply_label_noise(
        y, rate, dataset.num_classes, noise_kind, seed=data_seed * 1000 + _NOISE_STREAM, class_map=class_map
    )
    is_flipped = torch.zeros(len(y), dtype=torch.bool)
    is_flipped[flipped] = True
    return noisy, is_flipped


def human_labels(dataset: Dataset, config: dict[str, Any], data_seed: int) -> Tensor:
    """The whole training set's labels under a ``human:``/``twin:`` kind, in the dataset's order.

    Raises ValueError when ``label_noise_rate`` is set to anything but the kind's measured rate:
    that rate is the file's, not a setting."""
    kind = str(config["label_noise_kind"])
    rate = float(config.get("label_noise_rate", 0.0) or 0.0)
    measured = HUMAN_NOISE_RATES[kind]
    if rate and abs(rate - measured) > 1e-9:
        raise ValueError(
            f"label_noise_kind={kind!r} trains at its file's measured rate {measured:g}; "
            f"leave label_noise_rate unset (got {rate:g})"
        )
    base = str(config.get("dataset", dataset.name)).strip().lower()
    return noisy_train_labels(dataset, base, kind, config.get("data_root"), data_seed * 1000 + _NOISE_STREAM)

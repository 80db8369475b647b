"""Search space files: loading and validating a ``search_spaces/*.py`` study into a `Sweep`.

A search space file is plain Python, executed with the user's rights (like a ``conftest.py``). It
defines two things:

- ``space(trial)``: an Optuna define-by-run function (Optuna's own convention: ``trial.suggest_*``
  calls, conditional parameters written as ordinary ``if``); it may return a dict of constants
  that join the trial config.
- ``SWEEP = Sweep(...)``: the study around it: dataset, model, scenario cells (one per label-noise
  rate), budget, resources, the metric ASHA and TPE optimise, and the seed.

Everything is validated before any Ray trial or MLflow run exists: unknown keys, wrong types,
empty ranges, ``rho < 0``, an ``m`` that does not divide the per-worker batch, noise rates outside
[0, 1), unknown dataset/model names. Each problem is one `SpaceError` (a ValueError) whose message
is one line naming the file, the line where it can, the setting and what was expected.

The trial config (one flat dict per trial) is what ``samtune.train.fit`` consumes; `TRIAL_KEYS`
lists every key and what it accepts.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import math
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "SpaceError",
    "Sweep",
    "Cell",
    "SpaceFunction",
    "TRIAL_KEYS",
    "METRICS",
    "load_space",
    "validate_trial_config",
    "check_space",
    "space_fingerprint",
    "fingerprint_changes",
    "apply_overrides",
    "parse_assignments",
    "parse_trial_value",
    "fixed_trial_config",
]


class SpaceError(ValueError):
    """A mistake in a search space file, an override or a trial config; the message is one line."""


# --------------------------------------------------------------------------------------------
# Value specs: one place that knows what each setting accepts, used to validate values given in
# Python and to parse values given on the command line (`--set`, `--params`).

def _known_models() -> tuple[str, ...]:
    try:
        from samtune.models import MODELS
        return tuple(sorted(MODELS))
    except ImportError:  # models.py not importable: fall back to the documented names
        return ("cnn", "mlp", "resnet18", "resnet20", "resnet32", "resnet56", "wrn16_8", "wrn28_10")


def _known(module: str, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):
        return default


def _check_dataset(key: str, value: str) -> None:
    """Every name the data layer reads (`samtune.data.parse_dataset_name`): a dataset, optionally
    with a class selection such as ``digits[0-4]``. The indices are checked against the dataset
    where it is read, before any trial (`samtune.preflight`)."""
    from samtune.data import DATASETS, parse_dataset_name

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
    raise SpaceError(f"unknown {key} {value!r}; expected one of {list(DATASETS)} or 'imagefolder:<path>', "
                     f"optionally with a class selection such as [0-4]" + _suggest(base, DATASETS))


def _check_model(key: str, value: str) -> None:
    if value.startswith("torchvision:"):
        if not value.split(":", 1)[1].strip():
            raise SpaceError(f"{key}='torchvision:' needs an architecture, e.g. 'torchvision:resnet18'")
        return
    models = _known_models()
    if value not in models:
        raise SpaceError(f"unknown {key} {value!r}; expected one of {list(models)} or 'torchvision:<name>'"
                         + _suggest(value, models))


def _suggest(value: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class _Spec:
    """What one setting accepts: a kind, optional None, choices, bounds and an extra check."""

    kind: str                                  # "int" | "float" | "str" | "bool"
    optional: bool = False                     # None allowed
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    low: float | None = None                   # lower bound
    low_open: bool = False                     # value must be > low (else >= low)
    high: float | None = None                  # upper bound
    high_open: bool = False                    # value must be < high (else <= high)
    check: Callable[[str, Any], None] | None = None
    doc: str = ""

    def expected(self) -> str:
        kind = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False",
                "any": "a value"}[self.kind]
        if self.choices is not None:
            kind = f"one of {list(self._choices())}"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = kind + (" " + " and ".join(bounds) if bounds else "")
        return text + (" or None" if self.optional else "")

    def _choices(self) -> tuple[str, ...]:
        return self.choices() if callable(self.choices) else tuple(self.choices or ())

    def validate(self, key: str, value: Any) -> Any:
        """Return ``value`` normalised (ints accepted where floats are); raise SpaceError if bad."""
        if value is None:
            if self.optional:
                return None
            raise SpaceError(f"{key}=None: expected {self.expected()}")
        if self.kind == "any":
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise SpaceError(f"{key}={value!r}: expected True or False, got {type(value).__name__}")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise SpaceError(f"{key}={value!r}: expected {self.expected()}, got {type(value).__name__}")
            if self.choices is not None and value not in self._choices():
                raise SpaceError(f"{key}={value!r}: expected one of {list(self._choices())}"
                                 + _suggest(value, self._choices()))
            if self.check is not None:
                self.check(key, value)
            return value
        # Numbers. bool is an int subclass in Python; a True where a number belongs is a mistake.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpaceError(f"{key}={value!r}: expected {self.expected()}, got {type(value).__name__}")
        if self.kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise SpaceError(f"{key}={value!r}: expected {self.expected()}")
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise SpaceError(f"{key}={value!r}: expected a finite number")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise SpaceError(f"{key}={value!r}: expected {self.expected()}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise SpaceError(f"{key}={value!r}: expected {self.expected()}")
        return value

    def parse(self, key: str, raw: str) -> Any:
        """Parse a command-line string into this kind, then validate it."""
        text = raw.strip()
        if self.optional and text.lower() in ("none", "null"):
            return None
        if self.kind == "any":
            # A literal where it reads as one (3, 0.1, True, (1, 2)), else the text itself.
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        if self.kind == "bool":
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise SpaceError(f"{key}={raw}: expected true or false")
        if self.kind == "int":
            try:
                value: Any = int(text)
            except ValueError:
                raise SpaceError(f"{key}={raw}: expected {self.expected()}") from None
        elif self.kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise SpaceError(f"{key}={raw}: expected {self.expected()}") from None
        else:
            value = text
        return self.validate(key, value)


def _choice(*options: str, doc: str = "") -> _Spec:
    return _Spec("str", choices=tuple(options), doc=doc)


_NORMS = lambda: _known("samtune.models", "NORMS", ("batch", "group", "none"))  # noqa: E731
_NOISE_KINDS = lambda: _known("samtune.scenarios", "NOISE_KINDS", ("symmetric", "pairflip", "asymmetric"))  # noqa: E731
_SCENARIOS = lambda: _known("samtune.scenarios", "SCENARIOS", ("label_noise", "finetune"))  # noqa: E731

#: Every key of a trial config, what it accepts and what it means. `samtune.train.fit` reads these.
TRIAL_KEYS: dict[str, _Spec] = {
    "dataset": _Spec("str", check=_check_dataset, doc="digits | cifar10 | cifar100 | imagefolder:<path>"),
    "data_root": _Spec("str", optional=True, doc="where datasets live (None: the package default)"),
    "data_subset": _Spec("int", optional=True, low=1, doc="training examples used (None: all)"),
    "test_subset": _Spec("int", optional=True, low=1, doc="test examples used (None: all)"),
    "data_seed": _Spec("int", optional=True, low=0, doc="fixes subset, noise, split (None: seed)"),
    "model": _Spec("str", check=_check_model, doc="model registry name"),
    "norm": _Spec("str", choices=_NORMS, doc="normalisation layers"),
    "scenario": _Spec("str", choices=_SCENARIOS, doc="label_noise | finetune"),
    "label_noise_rate": _Spec("float", low=0.0, high=1.0, high_open=True, doc="fraction of flipped labels"),
    "label_noise_kind": _Spec("str", choices=_NOISE_KINDS,
                              doc="symmetric | pairflip | asymmetric (CIFAR-10 class map)"),
    "val_fraction": _Spec("float", low=0.0, high=1.0, high_open=True, doc="validation share of training set"),
    "epochs": _Spec("int", low=1, doc="training epochs"),
    "batch_size": _Spec("int", low=1, doc="global batch size (all workers together)"),
    "seed": _Spec("int", low=0, doc="model initialisation and data order"),
    "workers": _Spec("int", low=1, doc="data-parallel workers per trial"),
    "use_gpu": _Spec("bool", doc="train on GPUs"),
    "baseline": _Spec("bool", doc="one of its cell's baseline trials (set by the sweep): ASHA never stops it"),
    "optimizer": _Spec("str", choices=lambda: _known("samtune.train", "OPTIMIZERS", ("sgd", "sam", "asam")),
                       doc="sgd | sam | asam (adaptive SAM)"),
    "base_optimizer": _Spec("str", choices=lambda: _known("samtune.train", "BASE_OPTIMIZERS", ("sgd", "adamw")),
                            doc="the optimizer SAM wraps"),
    "lr": _Spec("float", low=0.0, low_open=True, doc="peak learning rate"),
    "momentum": _Spec("float", low=0.0, high=1.0, high_open=True, doc="SGD momentum"),
    "weight_decay": _Spec("float", low=0.0, doc="L2 weight decay"),
    "rho": _Spec("float", low=0.0, doc="SAM radius"),
    "eta": _Spec("float", low=0.0, doc="ASAM's eta"),
    "m": _Spec("int", optional=True, low=1, doc="m-sharpness group size (None: the per-worker batch)"),
    "lr_schedule": _Spec("str", choices=lambda: _known("samtune.train", "LR_SCHEDULES", ("cosine", "constant")),
                         doc="learning-rate schedule"),
    "precision": _Spec("str", choices=lambda: _known("samtune.train", "PRECISIONS", ("fp32", "bf16")),
                       doc="fp32 | bf16 autocast | fp16 autocast + loss scaling (GPU)"),
    "sync_perturbation": _Spec("bool", doc="one SAM perturbation for the whole global batch"),
    "gpus_per_worker": _Spec("float", optional=True, low=0.0, low_open=True, doc="GPU share per worker"),
    "backend": _Spec("str", optional=True, choices=lambda: _known("samtune.train", "BACKENDS", ("gloo", "nccl")),
                     doc="torch.distributed backend (None: nccl on GPUs, else gloo)"),
    "channels_last": _Spec("bool", optional=True, doc="channels-last memory format (None: on for CUDA convnets)"),
    "compile": _Spec("bool", doc="torch.compile the model"),
    "compile_backend": _Spec("str", doc="torch.compile backend"),
    "pretrain_epochs": _Spec("int", optional=True, low=1, doc="finetune: epochs of the pretraining stage"),
    "pretrain_lr": _Spec("float", optional=True, low=0.0, low_open=True, doc="finetune: pretraining lr"),
    "pretrain_subset": _Spec("int", optional=True, low=1, doc="finetune: source examples pretrained on"),
    "pretrain_seed": _Spec("int", optional=True, low=0, doc="finetune: pretraining seed"),
    "pretrain_batch_size": _Spec("int", optional=True, low=1, doc="finetune: pretraining batch size (None: 128)"),
    "cpus_per_worker": _Spec("float", optional=True, low=0.0, low_open=True,
                             doc="CPUs per Ray Train worker (None: what fits beside the trial)"),
    "max_grad_norm": _Spec("float", optional=True, low=0.0, low_open=True, doc="gradient clipping"),
    "max_failures": _Spec("int", low=0, doc="worker-group restarts from the last checkpoint"),
    "placement_timeout_s": _Spec("float", low=0.0, low_open=True,
                                 doc="workers > 1: seconds a worker group may wait for its resources"),
    "sharpness_measures": _Spec("any", optional=True,
                                doc="sharpness measures: a tuple of names or 'a,b'; '' for none, 'default'"),
    "warmup_epochs": _Spec("int", low=0, doc="linear warm-up epochs"),
    "augment": _Spec("bool", optional=True, doc="random crop + flip (None: scenario default)"),
    "sharpness_every": _Spec("int", low=0, doc="measure sharpness every k epochs (0: at the end only)"),
    "sharpness_subset": _Spec("int", low=1, doc="examples used to measure sharpness"),
    "sam_variant": _Spec("str", choices=lambda: _known("samtune.variants", "VARIANTS", ("full",)),
                         doc="SAM variant ('full': every step two passes; cheaper ones in samtune.variants)"),
    "finetune_source": _Spec("str", optional=True, doc="pretrained weights for the finetune scenario"),
    "freeze_bn": _Spec("bool", doc="keep BatchNorm statistics fixed while finetuning"),
    "backbone_lr_scale": _Spec("float", low=0.0, doc="learning-rate multiplier for pretrained layers"),
    "divergence_loss": _Spec("float", low=0.0, low_open=True, doc="train loss above which a trial diverged"),
}

#: Keys that define the study (the cell and the budget); a space may not suggest them.
STUDY_KEYS = frozenset({"dataset", "data_root", "data_subset", "data_seed", "scenario", "label_noise_rate",
                        "label_noise_kind", "epochs", "workers", "use_gpu", "seed", "baseline"})


def _study_key_error(key: str, what: str) -> SpaceError | None:
    """The error for `what` (e.g. "space suggests 'epochs'") touching a key the study sets, with
    where it is set instead; None for a key anyone may set."""
    if key == "baseline":
        return SpaceError(f"{what}, which the sweep sets per trial (a cell's first SGD and SAM trials "
                          "are its baselines)")
    if key in STUDY_KEYS:
        owner = _SWEEP_OWNED.get(key, key)
        return SpaceError(f"{what}, which the Sweep fixes per cell; use --set {owner}=... "
                          f"(or Sweep({owner}=...) in the file)")
    return None

#: Per-epoch metrics a trial reports (the metric a sweep optimises must be one of these, or a
#: ``sharpness/<measure>`` measured every epoch). The trainer's own list wins where it declares
#: one (``samtune.train.METRICS``): Tune fails every trial whose result lacks the metric, so a
#: name the trainer never reports must be refused before the sweep starts.
METRICS = ("train_loss", "train_acc_noisy", "train_acc_true", "train_error", "val_error", "val_loss",
           "test_error", "test_loss", "generalization_gap", "epoch_time_s", "samples_per_s", "train_time_s",
           "compute_time_s")


def reported_metrics() -> tuple[str, ...]:
    """The per-epoch metrics a trial reports: ``samtune.train.METRICS`` if the trainer declares
    it (read when needed, so importing this module does not import torch), else `METRICS`."""
    return _known("samtune.train", "METRICS", METRICS)


def _train_default(key: str, default: Any) -> Any:
    try:
        return importlib.import_module("samtune.train").DEFAULTS.get(key, default)
    except (ImportError, AttributeError):
        return default


#: What a sweep name may hold: it names the MLflow experiment, a folder and the runs' keys, and a
#: quote or a slash would break one of them.
_NAME_CHARS = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._ -]*[A-Za-z0-9._-])?")


def _check_metric_reported(metric: str, config: dict[str, Any], where: str = "") -> None:
    """Raise SpaceError when trials run with ``config`` would not report ``metric`` every epoch.

    ASHA compares trials at every rung and Tune rejects a result without the metric, so a metric
    that is missing from some epochs fails every trial instead of guiding the search.
    """
    if metric in ("val_error", "val_loss") and config.get("val_fraction") == 0:
        raise SpaceError(f"{where}metric={metric!r} with val_fraction=0: there is no validation split, so "
                         f"no trial reports {metric}; set fixed.val_fraction > 0 or metric="
                         f"{metric.replace('val_', 'test_')!r}")
    if not metric.startswith("sharpness/"):
        return
    every = config.get("sharpness_every") or 0
    if every != 1:
        raise SpaceError(f"{where}metric={metric!r} is measured only "
                         f"{'at the last epoch' if every == 0 else f'every {every} epochs'} "
                         f"(sharpness_every={every}), but ASHA needs it every epoch; "
                         f"set sharpness_every=1 or optimise val_error")
    measures = config.get("sharpness_measures")
    # The trainer's reading of the setting: None or "default" is its default list, "" none.
    if measures is None or measures == "default":
        measures = _train_default("sharpness_measures", ())
    if isinstance(measures, str):
        measures = measures.split(",")
    measures = {str(m).strip() for m in measures} - {""}
    name = metric.split("/")[1]
    # ``hessian_top_eig_2`` is the second eigenvalue of the ``hessian_top_eig`` measure.
    if name not in measures and re.sub(r"_\d+$", "", name) not in measures:
        raise SpaceError(f"{where}metric={metric!r}: {name!r} is not among the measured sharpness_measures "
                         f"{sorted(measures) or '(none)'}; add it to fixed.sharpness_measures")


def _merge_train_keys() -> None:
    """Accept every other key the trainer reads: `samtune.train.DEFAULTS` and the SAM variants'
    `CONFIG_KEYS`. Their values are checked by `samtune.train.resolve_config` (see
    `validate_trial_config`), so here they take any value."""
    keys: list[str] = []
    for module, name in (("samtune.train", "DEFAULTS"), ("samtune.variants", "CONFIG_KEYS")):
        try:
            declared = getattr(importlib.import_module(module), name)
        except Exception:  # noqa: BLE001  module absent or broken: the table above stands
            continue
        keys.extend(declared)
    for key in keys:
        if key not in TRIAL_KEYS:
            TRIAL_KEYS[key] = _Spec("any", optional=True, doc="(read by samtune.train)")


def _trial_spec(key: str, where: str) -> _Spec:
    if key not in TRIAL_KEYS:
        _merge_train_keys()
    if key not in TRIAL_KEYS:
        raise SpaceError(f"{where}unknown trial setting {key!r}{_suggest(key, TRIAL_KEYS)}; "
                         f"known: {', '.join(sorted(TRIAL_KEYS))}")
    return TRIAL_KEYS[key]


def parse_trial_value(key: str, raw: str) -> Any:
    """Parse ``raw`` (command-line text) for trial setting ``key``; SpaceError if unknown or bad."""
    return _trial_spec(key, "").parse(key, raw)


def validate_trial_config(config: dict[str, Any], where: str = "", whole: bool = True) -> dict[str, Any]:
    """Check a trial config: every key known, every value of the right type and range, and (with
    ``whole``) the rules between keys, by the trainer's own `samtune.train.resolve_config`: the
    batch divisible by the workers, ``m`` dividing the per-worker batch (or a multiple of it
    across workers), the SAM variant's knobs, ``fp16`` only on GPUs.

    ``whole=False`` checks keys one by one (a partial config such as ``Sweep.fixed``). Returns a
    normalised copy. Raises SpaceError naming the first problem, prefixed by ``where``.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        spec = _trial_spec(key, where)
        try:
            out[key] = spec.validate(key, value)
        except SpaceError as exc:
            raise SpaceError(f"{where}{exc}") from None
    if whole:
        try:
            from samtune.train import TrialConfigError, resolve_config
        except ImportError:  # the trainer is not importable: per-key checks only
            return out
        try:
            resolve_config(out)
        except (TrialConfigError, ValueError) as exc:
            raise SpaceError(f"{where}{_first_line(exc)}") from None
    return out


# --------------------------------------------------------------------------------------------
# The Sweep


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


_SWEEP_SPECS: dict[str, _Spec] = {
    "name": _Spec("str", doc="experiment name (MLflow) and directory name (Ray)"),
    "dataset": TRIAL_KEYS["dataset"],
    "model": TRIAL_KEYS["model"],
    "epochs": TRIAL_KEYS["epochs"],
    "batch_size": TRIAL_KEYS["batch_size"],
    "trials": _Spec("int", low=1, doc="trials per cell"),
    "scenario": TRIAL_KEYS["scenario"],
    "label_noise_kind": TRIAL_KEYS["label_noise_kind"],
    "workers": TRIAL_KEYS["workers"],
    "gpus_per_trial": _Spec("float", low=0.0, doc="GPUs per trial (fractions pack trials onto a GPU)"),
    "cpus_per_trial": _Spec("float", low=0.0, low_open=True, doc="CPUs per trial"),
    "metric": _Spec("str", doc="per-epoch metric ASHA and TPE optimise"),
    "mode": _choice("min", "max"),
    "seed": TRIAL_KEYS["seed"],
    "data_subset": TRIAL_KEYS["data_subset"],
    "max_concurrent": _Spec("int", optional=True, low=1, doc="trials at once (None: what the cluster fits)"),
    "grace_period": _Spec("int", optional=True, low=1, doc="ASHA: epochs before a trial may stop"),
    "reduction_factor": _Spec("float", low=1.0, low_open=True, doc="ASHA: keep 1/this at each rung"),
    "sharpness_every": TRIAL_KEYS["sharpness_every"],
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
    fixed: dict[str, Any] = field(default_factory=dict)

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
                             f"'sharpness/<measure>'{_suggest(self.metric, metrics)}")
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
            if key in _SWEEP_OWNED:
                raise SpaceError(f"fixed sets {key!r}, which Sweep sets itself; use Sweep({_SWEEP_OWNED[key]}=...)")
            if key == "baseline":  # a study key fixed may not set (data_root, say, it may)
                raise _study_key_error(key, "fixed sets 'baseline'")
        fixed = validate_trial_config(dict(self.fixed), where="fixed: ", whole=False)
        object.__setattr__(self, "fixed", fixed)
        # The whole base config must hold together (e.g. a fixed m against the batch).
        validate_trial_config(self.base_config(self.cells()[0]), where="")
        _check_metric_reported(self.metric, self.base_config(self.cells()[0]))

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

    def replace(self, **changes: Any) -> "Sweep":
        """A copy with ``changes`` applied and validated again."""
        unknown = [k for k in changes if k not in _FIELD_NAMES]
        if unknown:
            raise SpaceError(_unknown_sweep_key(unknown[0]))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["label_noise_rates"] = list(self.label_noise_rates)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Sweep":
        """Build from a plain dict; unknown or missing keys give a SpaceError naming them."""
        if not isinstance(values, dict):
            raise SpaceError(f"SWEEP must be Sweep(...) or a dict, got {type(values).__name__}")
        for key in values:
            if key not in _FIELD_NAMES:
                raise SpaceError(_unknown_sweep_key(key))
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise SpaceError(f"Sweep needs {', '.join(missing)} (missing)")
        return cls(**values)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Sweep))
_REQUIRED = tuple(f.name for f in dataclasses.fields(Sweep)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
# Trial keys the Sweep sets from its own fields (so `fixed` must not).
_SWEEP_OWNED = {"dataset": "dataset", "model": "model", "scenario": "scenario", "epochs": "epochs",
                "batch_size": "batch_size", "seed": "seed", "data_seed": "seed", "workers": "workers",
                "label_noise_rate": "label_noise_rates", "label_noise_kind": "label_noise_kind",
                "data_subset": "data_subset", "use_gpu": "gpus_per_trial", "sharpness_every": "sharpness_every"}


def _unknown_sweep_key(key: str) -> str:
    return (f"Sweep has no setting {key!r}{_suggest(key, _FIELD_NAMES)}; "
            f"settings: {', '.join(_FIELD_NAMES)} (trial settings go in fixed={{...}})")


# --------------------------------------------------------------------------------------------
# Overrides from the command line


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
    """
    changes: dict[str, Any] = {}
    fixed = dict(sweep.fixed)
    for item in assignments:
        for key, raw in parse_assignments([item]):
            if key.startswith("fixed."):
                sub = key.split(".", 1)[1]
                if sub in _SWEEP_OWNED:
                    raise SpaceError(f"--set {key}: {sub!r} is a Sweep setting; use --set {_SWEEP_OWNED[sub]}=...")
                fixed[sub] = parse_trial_value(sub, raw)
            elif key == "label_noise_rates":
                changes[key] = _parse_rates(key, raw)
            elif key == "fixed":
                raise SpaceError("--set fixed=...: set one trial setting at a time, e.g. --set fixed.weight_decay=1e-4")
            elif key in _SWEEP_SPECS:
                changes[key] = _SWEEP_SPECS[key].parse(key, raw)
            else:
                hint = f"; for a trial setting use --set fixed.{key}=..." if key in TRIAL_KEYS else ""
                raise SpaceError(f"--set: {_unknown_sweep_key(key)}{hint}")
    if fixed != sweep.fixed:
        changes["fixed"] = fixed
    try:
        return sweep.replace(**changes) if changes else sweep
    except SpaceError as exc:
        raise SpaceError(f"--set: {exc}") from None


# --------------------------------------------------------------------------------------------
# Loading a space file


def _module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"_samtune_space_{digest}"


def _where_in(path: Path, tb: Any) -> str:
    """``file:line: `` of the deepest traceback frame inside the space file, else ``file: ``."""
    line = None
    for frame in traceback.extract_tb(tb):
        if os.path.abspath(frame.filename) == str(path):
            line = frame.lineno
    return f"{path}:{line}: " if line else f"{path}: "


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _exec_space_file(path: Path) -> dict[str, Any]:
    """Execute the file in a fresh namespace and return it; errors become one-line SpaceErrors."""
    shown = _display(path)
    if not path.exists():
        raise SpaceError(f"{shown}: no such search space file")
    if path.is_dir():
        raise SpaceError(f"{shown}: is a directory, expected a search space .py file")
    if path.suffix != ".py":
        raise SpaceError(f"{shown}: not a Python file (a search space file is a .py file defining space(trial) and SWEEP)")
    try:
        source = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SpaceError(f"{shown}: not a Python file (it is not UTF-8 text)") from None
    except OSError as exc:
        raise SpaceError(f"{shown}: cannot read: {exc.strerror}") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise SpaceError(f"{shown}:{exc.lineno}: syntax error: {exc.msg}") from None
    except ValueError as exc:  # e.g. null bytes
        raise SpaceError(f"{shown}: not a Python file ({exc})") from None
    module_name = _module_name(path)
    spec = importlib.util.spec_from_loader(module_name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    module.__file__ = str(path)
    try:
        exec(code, module.__dict__)  # noqa: S102  the file is the user's own Python, by design
    except SpaceError as exc:
        raise SpaceError(f"{_where_in(path, exc.__traceback__).replace(str(path), shown)}{exc}") from None
    except TypeError as exc:
        raise SpaceError(_describe_type_error(path, shown, exc)) from None
    except Exception as exc:  # noqa: BLE001  any error in user code: name it with its line
        where = _where_in(path, exc.__traceback__).replace(str(path), shown)
        raise SpaceError(f"{where}{type(exc).__name__}: {_first_line(exc)}") from None
    return module.__dict__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _describe_type_error(path: Path, shown: str, exc: TypeError) -> str:
    where = _where_in(path, exc.__traceback__).replace(str(path), shown)
    msg = str(exc)
    if "Sweep.__init__()" in msg:
        if "unexpected keyword argument" in msg:
            key = msg.rsplit("'", 2)[-2] if msg.count("'") >= 2 else "?"
            return f"{where}{_unknown_sweep_key(key)}"
        if "missing" in msg:
            missing = [k for k in _REQUIRED if f"'{k}'" in msg]
            return f"{where}Sweep needs {', '.join(missing) or msg} (missing)"
        if "positional" in msg:
            return f"{where}Sweep takes keyword arguments only, e.g. Sweep(name='x', dataset='digits', ...)"
    return f"{where}TypeError: {_first_line(exc)}"


class SpaceFunction:
    """The ``space(trial)`` of a search space file, picklable by path.

    Ray Tune checkpoints its searcher with ``pickle``; a function from a file that is not an
    importable module cannot be pickled by reference, so this wrapper pickles as its path and
    loads the file again when unpickled (on ``--resume``).
    """

    def __init__(self, path: str | os.PathLike[str], func: Callable[[Any], Any] | None = None) -> None:
        self.path = str(Path(path).resolve())
        if func is None:
            func = _space_from_namespace(Path(self.path), _exec_space_file(Path(self.path)))
        self._func = func
        self.__name__ = "space"

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        return self._func(trial)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SpaceFunction, (self.path,))

    def __repr__(self) -> str:
        return f"SpaceFunction({self.path!r})"


def _space_from_namespace(path: Path, namespace: dict[str, Any]) -> Callable[[Any], Any]:
    shown = _display(path)
    func = namespace.get("space")
    if func is None:
        raise SpaceError(f"{shown}: defines no space(trial) function (the Optuna define-by-run search space)")
    if not callable(func):
        raise SpaceError(f"{shown}: space is a {type(func).__name__}, expected a function space(trial)")
    return func


def load_space(path: str | os.PathLike[str]) -> tuple[Sweep, SpaceFunction]:
    """Load a search space file: return its validated `Sweep` and its ``space(trial)``.

    Raises SpaceError (one line) for a missing file, a file that is not Python, a syntax error
    (with file and line), an exception while running it (with line), no ``SWEEP``, a ``SWEEP``
    that is neither ``Sweep(...)`` nor a dict, any invalid setting, and no ``space`` function.
    The space itself is checked by `check_space`.
    """
    resolved = Path(path).expanduser().resolve()
    namespace = _exec_space_file(resolved)
    shown = _display(resolved)
    if "SWEEP" not in namespace:
        raise SpaceError(f"{shown}: defines no SWEEP (expected SWEEP = Sweep(name=..., dataset=..., ...))")
    raw = namespace["SWEEP"]
    if isinstance(raw, Sweep):
        sweep = raw
    else:
        try:
            sweep = Sweep.from_dict(raw)
        except SpaceError as exc:
            raise SpaceError(f"{shown}: SWEEP: {exc}") from None
    func = _space_from_namespace(resolved, namespace)
    return sweep, SpaceFunction(resolved, func)


# --------------------------------------------------------------------------------------------
# Checking a space by running it against a recording trial


@dataclass
class _Suggestion:
    name: str
    kind: str                       # "float" | "int" | "categorical"
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
        self._shown = _display(path)
        self.suggestions: list[_Suggestion] = []

    def _line(self) -> str:
        for frame in reversed(traceback.extract_stack()):
            if os.path.abspath(frame.filename) == self._path:
                return f"{self._shown}:{frame.lineno}: "
        return f"{self._shown}: "

    def _check_name(self, name: Any, line: str) -> None:
        if not isinstance(name, str):
            raise SpaceError(f"{line}parameter name {name!r} is not a string")
        _trial_spec(name, line)
        if (error := _study_key_error(name, f"{line}space suggests {name!r}")) is not None:
            raise error

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
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
                raise SpaceError(f"{line}{name}: suggest_int needs integer bounds and step, got "
                                 f"low={low!r}, high={high!r}, step={step!r}")
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
        return getattr(self._trial, item)


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


def check_space(sweep: Sweep, space: Callable[[Any], Any], samples: int = 64,
                with_constants: bool = False) -> list[dict[str, Any]]:
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
    shown = _display(path)
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
            where = _where_in(path.resolve(), exc.__traceback__).replace(str(path.resolve()), shown)
            raise SpaceError(f"{where}space(trial) raised {type(exc).__name__}: {_first_line(exc)}") from None
        if returned is not None and not isinstance(returned, dict):
            raise SpaceError(f"{shown}: space(trial) returned a {type(returned).__name__}; expected a dict or None")
        suggested = dict(trial.params)
        params = dict(suggested)
        for key, value in (returned or {}).items():
            if not isinstance(key, str):
                raise SpaceError(f"{shown}: space(trial) returned a non-string key {key!r}")
            _check_returned_key(key, shown)
            params[key] = value
        to_check = [s for s in proxy.suggestions if range_checks.get(s.name, 0) < 4]
        for s in to_check:
            range_checks[s.name] = range_checks.get(s.name, 0) + 1
        for cell in cells:
            config = sweep.trial_config(cell, params)
            validate_trial_config(config, where=f"{shown}: space(trial) gave ")
            # A space may return val_fraction or the sharpness settings itself.
            _check_metric_reported(sweep.metric, config, where=f"{shown}: space(trial) gave ")
            for s in to_check:
                for value in _candidates(s):
                    try:
                        validate_trial_config({**config, s.name: value})
                    except SpaceError as exc:
                        rng = (f"choices {list(s.choices)}" if s.kind == "categorical"
                               else f"range [{s.low:g}, {s.high:g}]")
                        raise SpaceError(f"{s.line}{s.name} {rng} includes a bad value: {exc}") from None
        sampled.append(params if with_constants else suggested)
        study.tell(trial, 0.0)
    return sampled


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


def fingerprint_changes(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """What differs between two `space_fingerprint`s, one phrase each."""
    changes = [f"{k}: was {before[k]}, now {now[k]}" for k in before if k in now and before[k] != now[k]]
    changes += [f"{k} is new ({now[k]})" for k in now if k not in before]
    changes += [f"{k} is gone" for k in before if k not in now]
    return changes


def _check_returned_key(key: str, shown: str) -> None:
    _trial_spec(key, f"{shown}: space(trial) returned ")
    if (error := _study_key_error(key, f"{shown}: space(trial) returned {key!r}")) is not None:
        raise error


# --------------------------------------------------------------------------------------------
# One trial by hand (`samtune train FILE --params ... --cell ...`)


def fixed_trial_config(sweep: Sweep, space: Callable[[Any], Any], cell: Cell,
                       params: dict[str, Any]) -> dict[str, Any]:
    """The trial config the sweep would run in ``cell`` if the space suggested ``params``.

    ``space`` runs on an Optuna ``FixedTrial`` holding ``params``, so conditional parameters and
    the constants the space returns come out exactly as in a sweep; ``params`` the space does not
    ask for in that branch are added as trial settings all the same (e.g. ``weight_decay``).
    Raises SpaceError when the space asks for a parameter ``params`` lacks, when ``params`` sets a
    key the Sweep fixes per cell (use ``--set``), or when the result fails validation.
    """
    import optuna

    for key in params:
        _trial_spec(key, "--params: ")
        if (error := _study_key_error(key, f"--params {key}=...")) is not None:
            raise error
    trial = optuna.trial.FixedTrial(dict(params))
    try:
        returned = space(trial) or {}
    except ValueError as exc:
        missing = str(exc).split("'")[1] if str(exc).count("'") >= 2 else None
        if missing is not None and "not found" in str(exc):
            raise SpaceError(f"--params: the space asks for {missing!r} in this branch; "
                             f"add it, e.g. --params {missing}=...") from None
        raise SpaceError(f"space(trial) raised ValueError: {_first_line(exc)}") from None
    config = {**sweep.base_config(cell), **returned, **trial.params, **params}
    return validate_trial_config(config, where="")

"""A trial's config, resolved: defaults filled in, every value a trial depends on checked
(`TrialConfigError` names what can never train), and the plan of how SAM's perturbations are
formed across workers (`perturbation_plan`, m-sharpness).

>>> cfg = resolve_config({"optimizer": "sam", "batch_size": 64, "workers": 2, "m": 16})
>>> perturbation_plan(cfg).describe()
"m=16: 2 groups of 16 in each worker's batch of 32, each with its own eps"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from samtune.contract.keys import (
    BACKENDS,
    BASE_OPTIMIZERS,
    DEFAULTS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
)
from samtune.optim.variants import SAMVariant, variant_from_config
from samtune.sharpness.measures import check_measures

#: Training examples `train_error` is measured on at the end of every epoch (see `samtune.trial`).
TRAIN_EVAL_SUBSET = 1024


class TrialConfigError(ValueError):
    """A trial config value that can never train (wrong name, impossible split, bad range)."""


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Perturbation:
    """How a SAM step's perturbations are formed across workers.

    `m`: examples behind one eps; `groups_per_worker`: eps per worker per step (> 1 when `m` is
    smaller than the per-worker batch); `workers_per_eps`: workers whose first gradients are
    averaged into one eps (1: per-worker, inside `no_sync()`; all workers: classic SAM).
    """

    m: int
    per_worker_batch: int
    workers: int
    groups_per_worker: int
    workers_per_eps: int
    paired: bool = False  # SAMPa on paired workers: ranks 2j and 2j + 1 share one local batch

    @property
    def data_shards(self) -> int:
        """How many ways the data is split: one shard per worker, or per pair of workers."""
        return self.workers // 2 if self.paired else self.workers

    @property
    def sync_all(self) -> bool:
        return self.workers > 1 and self.workers_per_eps == self.workers

    def describe(self) -> str:
        if self.paired:
            pairs = self.workers // 2
            return (
                f"m={self.m}: SAMPa on {pairs} pair{'s' if pairs > 1 else ''} of workers, each "
                f"pair on its own batch of {self.per_worker_batch}, one gradient per worker"
            )
        if self.groups_per_worker > 1:
            return (
                f"m={self.m}: {self.groups_per_worker} groups of {self.m} in each worker's "
                f"batch of {self.per_worker_batch}, each with its own eps"
            )
        if self.workers == 1:
            return f"m={self.m}: one eps from the whole batch"
        if self.workers_per_eps == 1:
            return f"m={self.m}: per-worker eps, first pass inside no_sync() on each of {self.workers} workers"
        if self.sync_all:
            return f"m={self.m}: first gradient all-reduced over all {self.workers} workers (classic SAM)"
        return (
            f"m={self.m}: first gradient all-reduced within {self.workers // self.workers_per_eps} "
            f"groups of {self.workers_per_eps} workers"
        )


def perturbation_plan(cfg: dict[str, Any]) -> Perturbation:
    """Resolve `m` / `sync_perturbation` against `batch_size` and `workers` (a resolved config).

    Raises `TrialConfigError` when `m` neither divides the per-worker batch nor is a multiple
    k x per-worker batch with k dividing `workers`, or contradicts `sync_perturbation=True`.
    """
    workers, batch = cfg["workers"], cfg["batch_size"]
    if _paired(cfg):
        return _paired_plan(cfg)
    local = batch // workers
    m = cfg["m"]
    if cfg["sync_perturbation"]:
        if m is not None and m != batch:
            raise TrialConfigError(
                f"sync_perturbation=True means m = the global batch {batch}, but m={m}; drop one of the two"
            )
        m = batch
    if m is None:
        m = local
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise TrialConfigError(f"m must be a positive integer or None, got {m!r}")
    if m <= local:
        if local % m:
            raise TrialConfigError(
                f"m={m} does not divide the per-worker batch {local} (batch_size={batch} / workers={workers})"
            )
        return Perturbation(m, local, workers, local // m, 1)
    k = m // local
    if m % local or workers % k:
        raise TrialConfigError(
            f"m={m} does not divide the per-worker batch {local} (batch_size={batch} / "
            f"workers={workers}) and is not k x {local} with k dividing workers={workers}"
        )
    return Perturbation(m, local, workers, 1, k)


def _paired(cfg: dict[str, Any]) -> bool:
    """Whether the trial runs SAMPa's two gradients on paired workers."""
    return cfg["optimizer"] != "sgd" and cfg.get("sam_variant") == "sampa" and cfg["workers"] > 1


def _paired_plan(cfg: dict[str, Any]) -> Perturbation:
    """SAMPa on `workers` (even) ranks: one perturbation per pair's whole local batch."""
    workers, batch = cfg["workers"], cfg["batch_size"]
    if workers % 2:
        raise TrialConfigError(
            f"sam_variant='sampa' pairs the workers (one computes the perturbed gradient, the "
            f"other the auxiliary one): workers must be 1 or even, got workers={workers}"
        )
    pairs = workers // 2
    if batch % pairs:
        raise TrialConfigError(
            f"batch_size={batch} does not split evenly over the {pairs} pairs "
            f"of workers={workers} (sam_variant='sampa'); use a multiple of {pairs}"
        )
    local = batch // pairs
    if cfg["sync_perturbation"] or (cfg["m"] is not None and cfg["m"] != local):
        raise TrialConfigError(
            f"sam_variant='sampa' takes one perturbation per step for the whole local batch of "
            f"{local}, so it does not combine with m={cfg['m']} or sync_perturbation=True; "
            f"leave both unset"
        )
    return Perturbation(local, local, workers, 1, 1, paired=True)


def _check_variant(cfg: dict[str, Any], plan: Perturbation) -> None:
    """The SAM variant's knobs, and the settings it cannot run with."""
    variant = variant_from_settings(cfg, total_steps=cfg["epochs"])
    if variant.uses_whole_batch_gradient and plan.groups_per_worker > 1:
        raise TrialConfigError(
            f"sam_variant={variant.name!r} {variant.whole_batch_reason.replace('local', 'per-worker')}, "
            f"so it does not combine with m={plan.m} < per-worker batch {plan.per_worker_batch}"
        )
    if variant.name in ("msam", "sampa") and cfg["optimizer"] == "asam":
        raise TrialConfigError(
            f"sam_variant={variant.name!r} needs optimizer='sam': ASAM's "
            f"adaptive scaling is not defined for its perturbation"
        )
    if variant.name == "msam" and cfg["base_optimizer"] == "sgd" and not cfg["momentum"] > 0:
        raise TrialConfigError(
            "sam_variant='msam' perturbs along SGD's momentum buffer: it needs "
            f"momentum > 0, got momentum={cfg['momentum']!r}"
        )
    if variant.name == "sampa" and cfg["precision"] == "fp16":
        raise TrialConfigError(
            "sam_variant='sampa' keeps a gradient from one step to the next, which "
            "fp16 loss scaling would rescale or skip: use precision 'bf16' or 'fp32'"
        )


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check the values a trial depends on; raises `TrialConfigError`.

    Checks: optimizer/base optimizer/schedule/precision/backend names, positive epochs and lr,
    rho >= 0, a global batch divisible by the worker count, `m` (see `perturbation_plan`), the
    SAM variant and its knobs, and fp16 only on GPUs. Keys set to None take their default.
    Unknown keys are kept (the sweep may add its own bookkeeping keys).
    """
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None or k not in DEFAULTS}}
    for key, options in (
        ("optimizer", OPTIMIZERS),
        ("base_optimizer", BASE_OPTIMIZERS),
        ("lr_schedule", LR_SCHEDULES),
        ("precision", PRECISIONS),
    ):
        if cfg[key] not in options:
            raise TrialConfigError(f"{key}={cfg[key]!r} is not one of {options}")
    if cfg["backend"] is not None and cfg["backend"] not in BACKENDS:
        raise TrialConfigError(f"backend={cfg['backend']!r} is not one of {BACKENDS} (or None)")
    for key in ("epochs", "batch_size", "workers"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise TrialConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if not cfg["lr"] > 0:
        raise TrialConfigError(f"lr must be > 0, got {cfg['lr']!r}")
    if not (isinstance(cfg["placement_timeout_s"], (int, float)) and cfg["placement_timeout_s"] > 0):
        raise TrialConfigError(f"placement_timeout_s must be > 0 seconds, got {cfg['placement_timeout_s']!r}")
    if not cfg["rho"] >= 0:
        raise TrialConfigError(f"rho must be >= 0, got {cfg['rho']!r}")
    if cfg["batch_size"] % cfg["workers"] and not _paired(cfg):
        raise TrialConfigError(
            f"batch_size={cfg['batch_size']} does not split evenly over "
            f"workers={cfg['workers']}; use a multiple of {cfg['workers']}"
        )
    plan = perturbation_plan(cfg)
    if cfg["precision"] == "fp16" and not cfg["use_gpu"]:
        raise TrialConfigError(
            "precision='fp16' needs use_gpu=True (its loss scaling is for CUDA); use 'bf16' or 'fp32' on CPUs"
        )
    if cfg["sharpness_every"] < 0:
        raise TrialConfigError(f"sharpness_every must be >= 0, got {cfg['sharpness_every']!r}")
    measures = cfg["sharpness_measures"]
    if isinstance(measures, str):  # "m_sharpness,hessian_trace" from a command line; "" = none
        measures = DEFAULTS["sharpness_measures"] if measures == "default" else measures.split(",")
    cfg["sharpness_measures"] = tuple(name.strip() for name in (measures or ()) if name.strip())
    if cfg["sharpness_settings"] is not None and not isinstance(cfg["sharpness_settings"], dict):
        raise TrialConfigError(
            f"sharpness_settings must be a dict of per-measure settings, got {cfg['sharpness_settings']!r}"
        )
    try:
        check_measures(cfg["sharpness_measures"], cfg["sharpness_settings"])
    except ValueError as exc:
        raise TrialConfigError(str(exc)) from None
    if cfg["optimizer"] != "sgd":
        _check_variant(cfg, plan)
    return cfg


def variant_from_settings(cfg: dict[str, Any], total_steps: int) -> SAMVariant:

    try:
        return variant_from_config(cfg, total_steps=total_steps)
    except ValueError as exc:
        raise TrialConfigError(str(exc)) from None

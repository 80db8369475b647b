"""The training function: one trial of SGD/SAM/ASAM on a scenario, in one process or under Ray Train.

One body, three ways in:

- `fit(config)`: in this process, no Ray needed (one worker). Returns the last epoch's metrics.
- `train_loop_per_worker(config)`: the Ray Train worker function, for
  `TorchTrainer(train_loop_per_worker, train_loop_config=..., scaling_config=...)` in the sweep or
  in a user's own Ray cluster (it also runs under a plain `torch.distributed` job, e.g. torchrun).
- `run_trial(config)`: the Ray Tune function trainable the sweep runs for every trial: the loop in
  the trial process for one worker; for several, a `TorchTrainer` started inside the trial (Ray
  Train V2's way of nesting Train in Tune) whose `TuneReportCallback` passes every epoch's metrics
  back to Tune, so ASHA sees every epoch either way.

Data parallelism and m-sharpness (Foret et al. 2020, section 4.1). Each worker trains under DDP on
its share of every global batch (per-worker batch = batch_size / workers). How many examples one
SAM perturbation eps comes from is `m` (`perturbation_plan` resolves it):

- `m` None or = per-worker batch: each worker's first pass runs inside `no_sync()` and it perturbs
  with its own gradient; only the second pass all-reduces (one round per step, no extra traffic).
- `m` a divisor of the per-worker batch: each worker also cuts its batch into groups of `m`.
- `m` = k x per-worker batch with k dividing `workers`: the first gradient is all-reduced within
  groups of k consecutive ranks (`torch.distributed.new_group`); k = workers, i.e. `m` = the
  global batch (or `sync_perturbation=True`), is classic SAM with one eps for the whole batch.
Every epoch reports `m_effective` (examples behind one eps) and `m_workers` (workers sharing it).

Data stay tensor-resident (uint8 on the training device); each epoch draws one seeded global
permutation, identical on every worker, and worker r takes every world-th index of it, so the
global batch is the same whatever the worker count. Augmentation runs on whole batches.

Every epoch reports the metrics below and a checkpoint (model, optimizer including SAM's base
optimizer and variant state, LR schedule, fp16 loss scale, epoch, cumulative time). A resumed run
continues exactly where the checkpoint left it: all randomness (data order, augmentation, the
global torch generator used by dropout) is re-derived from (seed, epoch, rank) at every epoch
rather than carried in a generator.

Per-epoch metrics:

- `epoch`; `train_loss`, `train_acc_noisy` (accuracy on the labels trained on) and
  `train_acc_true` (on the clean labels): running means over the epoch's training steps, i.e. in
  train mode, on augmented batches, while the weights move;
- `train_error`: top-1 error in eval mode at the end of the epoch on a fixed training subset (the
  first `TRAIN_EVAL_SUBSET` = 1,024 indices of a permutation seeded with `seed + 7919`, the same
  permutation whose first `sharpness_subset` indices the sharpness measures use), against the
  labels trained on, without augmentation;
- `flipped_acc_noisy` / `flipped_acc_true`: on the examples of that subset whose label the noise
  flipped (only when it holds some), eval-mode accuracy against the noisy label (memorisation)
  and against the true label;
- `val_error` / `val_loss` (held-out part of the noisy training set; absent with
  `val_fraction=0`), `test_error` / `test_loss` (clean test set): eval-mode top-1 error and mean
  cross-entropy;
- `generalization_gap` = `test_error - train_error`;
- `epoch_time_s`, `samples_per_s`, `train_time_s` (cumulative), `compute_time_s` (cumulative
  seconds of the trial's own epochs: training, evaluation and sharpness; what it costs without
  process start, data loading, reporting and checkpointing), `lr` (the head's, i.e. the
  schedule's current learning rate), `lr_backbone` (finetuning: the pretrained layers' learning
  rate, `lr x backbone_lr_scale`), `diverged` (0/1);
- SAM/ASAM: how m-sharpness was realised: `m_effective` (examples behind one eps), `m_workers`
  (workers sharing one eps), `m_groups_per_worker` (eps per worker per step),
  `m_per_worker_batch`, and `m_plan` (the same in words, a string);
- `nodes` (distinct Ray nodes the trial's workers run on) and `placement` (a string: the Ray
  node id of each worker, in rank order), under Ray only; `allreduce_per_step` (gradient
  all-reduce rounds per training step, several workers only: 1 for SGD and per-worker SAM, 2 for
  classic SAM's synced perturbation);
- `sharpness/<measure>` when measured: `samtune.sharpness.measure_sharpness` on
  `sharpness_subset` training examples (noisy labels; the first `sharpness_subset` indices of a
  permutation seeded with `seed + 7919`), at the last epoch and every `sharpness_every` epochs.

A trial whose loss goes non-finite (or above `divergence_loss`) is *diverged*: it reports one last
result with `diverged=1` and the worst value of every metric a sweep can optimise (errors and
the gap 1.0, accuracies 0.0, losses `divergence_loss`): a bad result for ASHA/Optuna whatever the
sweep's metric, not a crash. It leaves the non-finite values out, and ends.

GPU path (`use_gpu=True`): CUDA device per worker, NCCL when every worker has a GPU of its own and
gloo when workers share one (NCCL refuses two ranks on one device), `precision="bf16"` autocast
(where the device supports it) or `"fp16"` autocast with a `GradScaler` that unscales once per
SAM step, `channels_last` for convnets, and `compile=True` for `torch.compile`.
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
from samtune.optim.variants import variant_from_config
from samtune.sharpness.measures import check_measures

#: Training examples `train_error` is measured on at the end of every epoch (see the module doc).
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

    @property
    def sync_all(self) -> bool:
        return self.workers > 1 and self.workers_per_eps == self.workers

    def describe(self) -> str:
        if self.groups_per_worker > 1:
            return (f"m={self.m}: {self.groups_per_worker} groups of {self.m} in each worker's "
                    f"batch of {self.per_worker_batch}, each with its own eps")
        if self.workers == 1:
            return f"m={self.m}: one eps from the whole batch"
        if self.workers_per_eps == 1:
            return (f"m={self.m}: per-worker eps, first pass inside no_sync() on each of "
                    f"{self.workers} workers")
        if self.sync_all:
            return f"m={self.m}: first gradient all-reduced over all {self.workers} workers (classic SAM)"
        return (f"m={self.m}: first gradient all-reduced within {self.workers // self.workers_per_eps} "
                f"groups of {self.workers_per_eps} workers")


def perturbation_plan(cfg: dict[str, Any]) -> Perturbation:
    """Resolve `m` / `sync_perturbation` against `batch_size` and `workers` (a resolved config).

    Raises `TrialConfigError` when `m` neither divides the per-worker batch nor is a multiple
    k x per-worker batch with k dividing `workers`, or contradicts `sync_perturbation=True`.
    """
    workers, batch = cfg["workers"], cfg["batch_size"]
    local = batch // workers
    m = cfg["m"]
    if cfg["sync_perturbation"]:
        if m is not None and m != batch:
            raise TrialConfigError(f"sync_perturbation=True means m = the global batch {batch}, "
                                   f"but m={m}; drop one of the two")
        m = batch
    if m is None:
        m = local
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise TrialConfigError(f"m must be a positive integer or None, got {m!r}")
    if m <= local:
        if local % m:
            raise TrialConfigError(f"m={m} does not divide the per-worker batch {local} "
                                   f"(batch_size={batch} / workers={workers})")
        return Perturbation(m, local, workers, local // m, 1)
    k = m // local
    if m % local or workers % k:
        raise TrialConfigError(
            f"m={m} does not divide the per-worker batch {local} (batch_size={batch} / "
            f"workers={workers}) and is not k x {local} with k dividing workers={workers}")
    return Perturbation(m, local, workers, 1, k)


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check the values a trial depends on; raises `TrialConfigError`.

    Checks: optimizer/base optimizer/schedule/precision/backend names, positive epochs and lr,
    rho >= 0, a global batch divisible by the worker count, `m` (see `perturbation_plan`), the
    SAM variant and its knobs, and fp16 only on GPUs. Keys set to None take their default.
    Unknown keys are kept (the sweep may add its own bookkeeping keys).
    """
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None or k not in DEFAULTS}}
    for key, options in (("optimizer", OPTIMIZERS), ("base_optimizer", BASE_OPTIMIZERS),
                         ("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS)):
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
    if cfg["batch_size"] % cfg["workers"]:
        raise TrialConfigError(f"batch_size={cfg['batch_size']} does not split evenly over "
                               f"workers={cfg['workers']}; use a multiple of {cfg['workers']}")
    plan = perturbation_plan(cfg)
    if cfg["precision"] == "fp16" and not cfg["use_gpu"]:
        raise TrialConfigError("precision='fp16' needs use_gpu=True (its loss scaling is for CUDA); "
                               "use 'bf16' or 'fp32' on CPUs")
    if cfg["sharpness_every"] < 0:
        raise TrialConfigError(f"sharpness_every must be >= 0, got {cfg['sharpness_every']!r}")
    measures = cfg["sharpness_measures"]
    if isinstance(measures, str):  # "m_sharpness,hessian_trace" from a command line; "" = none
        measures = DEFAULTS["sharpness_measures"] if measures == "default" else measures.split(",")
    cfg["sharpness_measures"] = tuple(name.strip() for name in (measures or ()) if name.strip())
    if cfg["sharpness_settings"] is not None and not isinstance(cfg["sharpness_settings"], dict):
        raise TrialConfigError(f"sharpness_settings must be a dict of per-measure settings, "
                               f"got {cfg['sharpness_settings']!r}")
    try:
        check_measures(cfg["sharpness_measures"], cfg["sharpness_settings"])
    except ValueError as exc:
        raise TrialConfigError(str(exc)) from None
    if cfg["optimizer"] != "sgd":
        variant = _variant(cfg, total_steps=cfg["epochs"])
        if variant.uses_whole_batch_gradient and plan.groups_per_worker > 1:
            raise TrialConfigError(
                f"sam_variant={variant.name!r} decides from the whole per-worker batch's gradient, "
                f"so it does not combine with m={plan.m} < per-worker batch {plan.per_worker_batch}")
    return cfg


def _variant(cfg: dict[str, Any], total_steps: int):

    try:
        return variant_from_config(cfg, total_steps=total_steps)
    except ValueError as exc:
        raise TrialConfigError(str(exc)) from None

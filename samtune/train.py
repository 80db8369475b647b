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

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .data import augment_batch, to_float
from .models import param_groups
from . import sam as _sam
from .sam import SAM, sam_step
from .scenarios import build_scenario
from .sharpness import check_measures, measure_sharpness

__all__ = ["DEFAULTS", "Perturbation", "TRAIN_EVAL_SUBSET", "TrialConfigError", "fit",
           "perturbation_plan", "resolve_config", "run_trial", "train_loop_per_worker",
           "worker_resources"]

log = logging.getLogger(__name__)

# Every key a trial config may carry, with its default. The sweep adds the cell's keys.
DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data_root": None,
    "data_subset": None,
    "test_subset": None,
    "model": "cnn",
    "norm": "batch",
    "scenario": "label_noise",
    "label_noise_rate": 0.0,
    "label_noise_kind": "symmetric",
    "val_fraction": 0.1,
    "epochs": 10,
    "batch_size": 64,             # global: all workers together
    "seed": 0,
    "workers": 1,
    "use_gpu": False,
    "baseline": False,            # a cell's baseline trial (the sweep sets it): ASHA never stops it
    "cpus_per_worker": None,      # None: what fits beside the trial driver (worker_resources)
    "gpus_per_worker": None,      # None: 1 each, or a share when workers outnumber the GPUs
    "backend": None,              # torch.distributed backend; None: nccl on own GPUs, else gloo
    "precision": "fp32",          # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, GPU)
    "channels_last": None,        # None: on for convnets on CUDA
    "compile": False,             # torch.compile the model
    "compile_backend": "inductor",
    "optimizer": "sgd",
    "base_optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "rho": 0.05,
    "m": None,                    # examples per SAM perturbation; None: the per-worker batch
    "sync_perturbation": False,   # True: one eps for the whole global batch (classic SAM)
    "eta": 0.01,
    "lr_schedule": "cosine",
    "warmup_epochs": 0,
    "augment": None,
    "max_grad_norm": None,
    "sharpness_every": 0,
    "sharpness_subset": 1024,
    "sharpness_measures": ("m_sharpness", "adaptive_sharpness", "adaptive_sharpness_linf",
                           "avg_sharpness", "hessian_top_eig", "hessian_trace"),
    "sharpness_settings": None,   # per-measure overrides, e.g. {"m_sharpness": {"rho": 0.1}}
    "sam_variant": "full",
    "finetune_source": None,
    "freeze_bn": False,
    "divergence_loss": 1e3,
    "max_failures": 2,
    "placement_timeout_s": 300.0,  # workers > 1: longest wait for the worker group's resources
}

OPTIMIZERS = ("sgd", "sam", "asam")
BASE_OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant", "step")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("gloo", "nccl")

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
    from .variants import variant_from_config

    try:
        return variant_from_config(cfg, total_steps=total_steps)
    except ValueError as exc:
        raise TrialConfigError(str(exc)) from None


# ----------------------------------------------------------------------------- reporting contexts
class _Session:
    """Where a run reports to and resumes from: plain process, Ray Train worker or Tune trial."""

    rank = 0
    world_size = 1
    inject_faults = True

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def load(self) -> dict[str, Any] | None:
        return None


class _LocalSession(_Session):
    """This process; with an initialised `torch.distributed` group (torchrun), one rank of it."""

    def __init__(self, report: Callable[[dict], None] | None, checkpoint_dir: str | None,
                 alone: bool = False):
        self._report = report
        self._dir = checkpoint_dir
        # A pretraining stage inside a worker must not kill it for a fault meant for the trial.
        self.inject_faults = not alone
        if not alone and dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def report(self, metrics, state):
        if self._dir is not None and state is not None and self.rank == 0:
            os.makedirs(self._dir, exist_ok=True)
            _atomic_save(state, os.path.join(self._dir, _CKPT_FILE))
        if self._report is not None:
            self._report(dict(metrics))

    def load(self):
        if self._dir is None:
            return None
        path = os.path.join(self._dir, _CKPT_FILE)
        return _load_state(path) if os.path.exists(path) else None


class _RaySession(_Session):
    """Ray Train worker (`ray.train`) or Tune function trainable (`ray.tune`): same shape of API."""

    def __init__(self, api):
        self._api = api
        if api.__name__.startswith("ray.train"):
            ctx = api.get_context()
            self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics, state):
        if state is None or self.rank != 0:
            self._api.report(metrics)  # every worker must call report: it is a barrier
            return
        with tempfile.TemporaryDirectory(prefix="samtune-ckpt-") as tmp:
            _atomic_save(state, os.path.join(tmp, _CKPT_FILE))
            self._api.report(metrics, checkpoint=self._api.Checkpoint.from_directory(tmp))

    def load(self):
        checkpoint = self._api.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return _load_state(os.path.join(folder, _CKPT_FILE))


_CKPT_FILE = "trial.pt"


def _atomic_save(state: dict, path: str) -> None:
    # Write then rename: a crash mid-write never leaves a truncated checkpoint behind.
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- building blocks
def _in_ray_train() -> bool:
    """Whether this process is a Ray Train worker (without importing Ray where it isn't loaded)."""
    if "ray.train" not in sys.modules:
        return False
    try:
        sys.modules["ray.train"].get_context().get_world_rank()
        return True
    except Exception:  # ray.train raises outside a worker (driver, Tune trial, plain process)
        return False


def _device(cfg: dict[str, Any], rank: int) -> torch.device:
    if not cfg["use_gpu"]:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrialConfigError("use_gpu=True but CUDA is not available on this worker")
    if _in_ray_train():
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:  # one GPU per local rank, shared round-robin
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    if cfg["precision"] == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrialConfigError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no "
                               f"bf16 support; use 'fp16' or 'fp32'")
    return device


def build_optimizer(cfg: dict[str, Any], model: nn.Module, total_steps: int,
                    backbone_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The trial's optimizer: the plain base optimizer for `sgd`, SAM around it for `sam`/`asam`
    (following the config's `sam_variant`, planned over `total_steps`).

    `backbone_lr_scale` != 1 (finetuning): two parameter groups, the classification head at `lr`
    (first group) and every other parameter at `lr * backbone_lr_scale`; 0 leaves the backbone
    out of the optimizer (`samtune.models.param_groups`). The LR schedule scales both alike.
    """
    base = torch.optim.SGD if cfg["base_optimizer"] == "sgd" else torch.optim.AdamW
    kwargs: dict[str, Any] = {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"]}
    if base is torch.optim.SGD:
        kwargs["momentum"] = cfg["momentum"]
        kwargs["nesterov"] = False
    try:
        params = param_groups(model, cfg["lr"], backbone_lr_scale)
    except ValueError as exc:
        raise TrialConfigError(str(exc)) from None
    if cfg["optimizer"] == "sgd":
        return base(params, **kwargs)
    variant = _variant(cfg, total_steps)
    return SAM(params, base_optimizer=base, rho=cfg["rho"], adaptive=cfg["optimizer"] == "asam",
               eta=cfg["eta"], variant=None if variant.name == "full" else variant, **kwargs)


def build_schedule(cfg: dict[str, Any], optimizer, steps_per_epoch: int):
    """Per-step LR multiplier: linear warmup, then cosine to 0, constant, or /10 at 50% and 75%."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = cfg["warmup_epochs"] * steps_per_epoch

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg["lr_schedule"] == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg["lr_schedule"] == "step":
            return 0.1 ** (int(progress >= 0.5) + int(progress >= 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The global shuffle of epoch `epoch`: identical on every worker and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _all_reduce(values: Tensor, world_size: int) -> Tensor:
    if world_size > 1:
        dist.all_reduce(values)
    return values


def _perturbation_groups(plan: Perturbation, rank: int):
    """This rank's process group for averaging first gradients (k consecutive ranks), or None.

    Every rank must create every group, in the same order (a collective of the default group)."""
    if plan.workers_per_eps == 1 or plan.sync_all:
        return None
    k = plan.workers_per_eps
    mine = None
    for start in range(0, plan.workers, k):
        group = dist.new_group(list(range(start, start + k)))
        if start <= rank < start + k:
            mine = group
    return mine


def _uses_conv(model: nn.Module) -> bool:
    return any(isinstance(mod, nn.Conv2d) for mod in model.modules())


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor, norm: tuple, device, rank: int, world: int,
              autocast, channels_last: bool, y_true: Tensor | None = None,
              batch: int = 1024) -> dict[str, float]:
    """Eval-mode top-1 `error` and mean cross-entropy `loss` of `model` on (x, y).

    Each worker takes a strided share and the sums are all-reduced once, so every worker must
    call it. `model` must be the unwrapped module: a forward through DistributedDataParallel may
    broadcast buffers, a collective whose count would then depend on each worker's share. With
    `y_true` also `flipped_acc_noisy` / `flipped_acc_true`: on the examples where `y != y_true`,
    the accuracy against `y` (memorised noisy labels) and against `y_true` (NaN where none).
    """
    was_training = model.training
    model.eval()
    xs, ys = x[rank::world], y[rank::world]
    ts = y_true[rank::world] if y_true is not None else None
    # wrong, summed loss, examples, flipped examples, flipped predicted as noisy, as true label
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for i in range(0, len(ys), batch):
        xb = to_float(xs[i:i + batch].to(device, non_blocking=True), *norm)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = ys[i:i + batch].to(device)
        with autocast:
            logits = model(xb)
        logits = logits.float()
        pred = logits.argmax(1)
        sums[0] += (pred != yb).sum()
        sums[1] += F.cross_entropy(logits, yb, reduction="sum")
        sums[2] += len(yb)
        if ts is not None:
            tb = ts[i:i + batch].to(device)
            flipped = yb != tb
            sums[3] += flipped.sum()
            sums[4] += (flipped & (pred == yb)).sum()
            sums[5] += (flipped & (pred == tb)).sum()
    model.train(was_training)
    sums = _all_reduce(sums, world).tolist()
    nan = float("nan")
    out = {"error": sums[0] / sums[2] if sums[2] else nan, "loss": sums[1] / sums[2] if sums[2] else nan}
    if ts is not None:
        out["flipped_acc_noisy"] = sums[4] / sums[3] if sums[3] else nan
        out["flipped_acc_true"] = sums[5] / sums[3] if sums[3] else nan
    return out


def _fixed_train_order(n: int, cfg: dict[str, Any]) -> Tensor:
    """A permutation of the training examples seeded with `seed + 7919`, the same at every epoch:
    its first indices are the examples `train_error` and sharpness are measured on."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] + 7919))


def _sharpness_indices(n: int, cfg: dict[str, Any]) -> Tensor:
    """The training examples sharpness is measured on: the first `sharpness_subset` of a
    permutation seeded with `seed + 7919` (the same examples at every epoch)."""
    return _fixed_train_order(n, cfg)[:min(cfg["sharpness_subset"], n)]


def _measure_sharpness(cfg, model: nn.Module, scenario, device) -> dict[str, float]:
    idx = _sharpness_indices(len(scenario.train_y), cfg)
    x = to_float(scenario.train_x[idx].to(device), scenario.mean, scenario.std)
    y = scenario.train_y[idx].to(device)
    settings = {name: dict(extra) for name, extra in (cfg["sharpness_settings"] or {}).items()}
    share = _memory_share(device)
    for name in ("hessian_top_eig", "hessian_trace"):
        if name in cfg["sharpness_measures"]:
            settings.setdefault(name, {}).setdefault("memory_share", share)
    return measure_sharpness(model, F.cross_entropy, x, y, measures=cfg["sharpness_measures"],
                             seed=cfg["seed"], **settings)


def _memory_share(device: torch.device) -> float:
    """The share of its machine's free memory this process may plan on (its CPU RAM, or its GPU's).

    Trials side by side on a machine reach their end-of-training sharpness measurement at about
    the same time; each counting on all the free memory for its Hessian graphs would together
    take more than there is (ResNet-32 on 1,024 examples kept 10 GB). So a Ray task gets the
    fraction of the machine's CPUs it holds (of one GPU, on a GPU); outside Ray, all of it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 1.0
    try:
        context = ray.get_runtime_context()
        held = context.get_assigned_resources()
        node = next(n for n in ray.nodes() if n.get("NodeID") == context.get_node_id())
        total = node.get("Resources", {})
    except Exception:  # noqa: BLE001  no runtime context (a driver): plan on the whole machine
        return 1.0
    return resource_share(held, total, "GPU" if device.type == "cuda" else "CPU")


def resource_share(held: dict[str, float], total: dict[str, float], kind: str) -> float:
    """``held[kind]`` over the machine's ``total[kind]`` CPUs, or of one GPU for "GPU" (a GPU's
    memory is per device), in (0, 1]; 1 where nothing is held or known."""
    amount = float(held.get(kind, 0.0))
    whole = 1.0 if kind == "GPU" else float(total.get(kind, 0.0))
    if amount <= 0 or whole <= 0:
        return 1.0
    return min(1.0, amount / whole)


def _wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    if world == 1:
        return model
    if _in_ray_train():
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)
    # a plain torch.distributed job outside Ray (torchrun)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


class _RoundCounter:
    """Gradient all-reduce rounds of this worker's training steps: DDP's (one per reduction; its
    last bucket closes it) plus those SAM steps make themselves (`sam.own_all_reduces`). The
    metric sums and divergence checks are not counted: they are the same whatever SAM does."""

    def __init__(self, model: nn.Module):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self._ddp = 0
        self._own_at_start = 0

        def counting(state, bucket):
            self._ddp += int(bucket.is_last())
            return default_hooks.allreduce_hook(state, bucket)

        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.register_comm_hook(None, counting)

    def start(self) -> None:
        self._ddp, self._own_at_start = 0, _sam.own_all_reduces

    def count(self) -> int:
        return self._ddp + _sam.own_all_reduces - self._own_at_start


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _sync_buffers(module: nn.Module, world: int) -> None:
    """Give every worker rank 0's buffers (BatchNorm running statistics) before evaluating.

    During training each worker's statistics follow its own batches (m-sharpness groups bypass
    DDP's buffer broadcast altogether), so without this each worker would evaluate its share
    with slightly different statistics than the checkpoint, which holds rank 0's. One explicit
    broadcast per buffer, called by every worker at the same point of every epoch.
    """
    if world == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # The global generator (dropout, stochastic layers) restarts from (seed, epoch, rank) every
    # epoch, so a run resumed at epoch k draws what the uninterrupted run drew.
    torch.manual_seed((seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1))


# ----------------------------------------------------------------------------- the loop
def _train(config: dict[str, Any], session: _Session,
           on_end: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    cfg = resolve_config(config)
    rank, world = session.rank, session.world_size
    if cfg["workers"] != world:
        # The sharding and the per-worker batch follow the actual worker group.
        cfg = resolve_config({**cfg, "workers": world})
    plan = perturbation_plan(cfg)
    device = _device(cfg, rank)

    scenario = build_scenario(cfg)
    # Seeded after the scenario: building it may pretrain a finetune source (which draws from the
    # global generator), and the head's initialisation must not depend on whether it did.
    torch.manual_seed(cfg["seed"])
    model = scenario.build_model(cfg["model"], cfg["norm"]).to(device)
    if cfg["freeze_bn"] or scenario.freeze_bn:
        from .models import freeze_batchnorm_stats

        freeze_batchnorm_stats(model)
    channels_last = cfg["channels_last"]
    if channels_last is None:
        channels_last = device.type == "cuda" and len(scenario.input_shape) == 3 and _uses_conv(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    module = model  # the plain module: its state dict is the checkpoint's, whatever wraps it
    if cfg["compile"]:
        # Compiled before DDP wraps it, so sam_step still sees a DDP model (no_sync) around it.
        model = torch.compile(model, backend=cfg["compile_backend"])
    model = _wrap_ddp(model, device, world)
    rounds = _RoundCounter(model) if world > 1 else None
    perturbation_group = _perturbation_groups(plan, rank) if world > 1 else None

    local_batch = plan.per_worker_batch
    n_train = len(scenario.train_y)
    steps = (n_train // world) // local_batch
    if steps < 1:
        raise TrialConfigError(f"batch_size={cfg['batch_size']} is larger than the {n_train} training "
                               f"examples of this scenario")
    optimizer = build_optimizer(cfg, module, total_steps=cfg["epochs"] * steps,
                                backbone_lr_scale=scenario.backbone_lr_scale)
    schedule = build_schedule(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler("cuda") if cfg["precision"] == "fp16" else None
    # On the device once: built from tuples per batch, each would be a host-to-device copy that
    # waits for the GPU's queue.
    norm = tuple(torch.as_tensor(v, dtype=torch.float32, device=device) for v in (scenario.mean, scenario.std))
    is_sam = cfg["optimizer"] != "sgd"
    if is_sam and rank == 0:
        log.info("SAM perturbation %s", plan.describe())

    # Tensor-resident data: uint8 on the device, normalised per batch (4x less memory than float).
    train_x = scenario.train_x.to(device)
    train_y = scenario.train_y.to(device)
    train_y_true = scenario.train_y_true.to(device)
    # The fixed training subset `train_error` is measured on (in eval mode, without augmentation).
    fixed = _fixed_train_order(n_train, cfg)[:TRAIN_EVAL_SUBSET].to(device)
    fixed_x, fixed_y, fixed_y_true = train_x[fixed], train_y[fixed], train_y_true[fixed]
    eval_model = _unwrap_ddp(model)  # no collective inside an evaluation forward

    placement = _placement(world)
    start_epoch, train_time, compute_time, last = 1, 0.0, 0.0, {}
    state = session.load()
    if state is not None:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, train_time, last = state["epoch"] + 1, state["train_time_s"], state["metrics"]
        compute_time = state.get("compute_time_s", train_time)
        if last.get("diverged"):
            return last

    # Every batch holds local_batch examples (the epoch's order is cut to whole batches); a
    # tensor made once, not a host-to-device copy per step.
    batch_n = torch.tensor(float(local_batch), dtype=torch.float64, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["precision"])
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    step_kwargs = {"m": plan.m if plan.groups_per_worker > 1 else None,
                   "sync_perturbation": plan.sync_all, "perturbation_group": perturbation_group,
                   "max_grad_norm": cfg["max_grad_norm"], "scaler": scaler}

    def checkpoint(epoch: int, metrics: dict) -> dict[str, Any]:
        return {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "epoch": epoch, "train_time_s": train_time, "compute_time_s": compute_time,
                "metrics": dict(metrics)}

    for epoch in range(start_epoch, cfg["epochs"] + 1):
        model.train()
        started = time.perf_counter()
        _seed_epoch(cfg["seed"], epoch, rank)
        order = _epoch_order(n_train, cfg["seed"], epoch)[rank::world][: steps * local_batch]
        order = order.to(device)
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] * 1_000_003 + epoch * 1009 + rank)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct noisy, true, n
        diverged = False
        if rounds is not None:
            rounds.start()
        for step in range(steps):
            idx = order[step * local_batch:(step + 1) * local_batch]
            xb = train_x[idx]
            if scenario.augment:
                xb = augment_batch(xb, gen)
            xb = to_float(xb, *norm)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = train_y[idx]
            with autocast:
                loss, logits = sam_step(model, F.cross_entropy, xb, yb, optimizer, **step_kwargs)
            schedule.step()
            pred = logits.argmax(1)
            sums += torch.stack([loss.double() * len(yb), (pred == yb).sum().double(),
                                 (pred == train_y_true[idx]).sum().double(),
                                 batch_n])
            # A cheap divergence check every few steps (one host sync), always at the end; every
            # worker takes the same decision, so none is left waiting in a collective.
            if step % 16 == 15 or step == steps - 1:
                value = float(loss)
                bad = torch.tensor([float(not math.isfinite(value) or value > cfg["divergence_loss"])],
                                   device=device)
                if _all_reduce(bad, world).item() > 0:
                    diverged = True
                    break
        sums = _all_reduce(sums, world)
        epoch_time = time.perf_counter() - started
        train_time += epoch_time
        if diverged:
            # Every metric a sweep may optimise, at its worst: Tune refuses a result that lacks
            # the sweep's metric, and a finite worst value keeps the trial a bad result.
            worst_loss = float(cfg["divergence_loss"])
            metrics = {"epoch": epoch, "diverged": 1, "val_error": 1.0, "test_error": 1.0,
                       "train_error": 1.0, "generalization_gap": 1.0, "train_acc_noisy": 0.0,
                       "train_acc_true": 0.0, "train_loss": worst_loss, "val_loss": worst_loss,
                       "test_loss": worst_loss, "samples_per_s": 0.0,
                       "epoch_time_s": epoch_time, "train_time_s": train_time}
            compute_time += time.perf_counter() - started
            metrics["compute_time_s"] = compute_time
            session.report(metrics, checkpoint(epoch, metrics))
            return metrics
        n_seen = float(sums[3])
        _sync_buffers(module, world)
        evaluate = dict(norm=norm, device=device, rank=rank, world=world, autocast=autocast,
                        channels_last=channels_last)
        on_train = _evaluate(eval_model, fixed_x, fixed_y, y_true=fixed_y_true, **evaluate)
        on_test = _evaluate(eval_model, scenario.test_x, scenario.test_y, **evaluate)
        metrics = {
            "epoch": epoch,
            "train_loss": float(sums[0]) / n_seen,
            "train_acc_noisy": float(sums[1]) / n_seen,
            "train_acc_true": float(sums[2]) / n_seen,
            "train_error": on_train["error"],
            "test_error": on_test["error"],
            "test_loss": on_test["loss"],
            "epoch_time_s": epoch_time,
            "samples_per_s": n_seen / epoch_time,
            "train_time_s": train_time,
            "lr": optimizer.param_groups[0]["lr"],
            "diverged": 0,
        }
        if len(scenario.val_y):  # else no validation split (val_fraction=0)
            on_val = _evaluate(eval_model, scenario.val_x, scenario.val_y, **evaluate)
            metrics["val_error"], metrics["val_loss"] = on_val["error"], on_val["loss"]
        if not math.isnan(on_train["flipped_acc_noisy"]):  # the subset holds flipped labels
            metrics["flipped_acc_noisy"] = on_train["flipped_acc_noisy"]
            metrics["flipped_acc_true"] = on_train["flipped_acc_true"]
        if scenario.initial_state is not None:
            metrics["lr_backbone"] = _backbone_lr(optimizer, scenario.backbone_lr_scale)
        if is_sam:
            metrics.update(m_effective=plan.m, m_workers=plan.workers_per_eps,
                           m_groups_per_worker=plan.groups_per_worker,
                           m_per_worker_batch=plan.per_worker_batch, m_plan=plan.describe())
        metrics["generalization_gap"] = metrics["test_error"] - metrics["train_error"]
        if placement:
            metrics.update(nodes=len(set(placement)), placement=",".join(placement))
        if rounds is not None:
            metrics["allreduce_per_step"] = rounds.count() / steps
        every = cfg["sharpness_every"]
        if cfg["sharpness_measures"] and (epoch == cfg["epochs"] or (every and epoch % every == 0)):
            if rank == 0:  # on the unwrapped module: no collectives, the other workers wait at report
                metrics.update(_measure_sharpness(cfg, module, scenario, device))
        compute_time += time.perf_counter() - started
        metrics["compute_time_s"] = compute_time
        session.report(metrics, checkpoint(epoch, metrics))
        last = metrics
        if session.inject_faults:
            _injected_fault(epoch)
    if on_end is not None:
        on_end(module)
    return last


def _placement(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order; empty outside Ray. A collective: every rank
    calls it (each decides by the same test, so none waits alone)."""
    node = ""
    if "ray" in sys.modules:
        try:
            ray = sys.modules["ray"]
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        except Exception:  # noqa: BLE001  not a Ray process after all
            node = ""
    nodes = [node]
    if world > 1:
        nodes = [""] * world
        dist.all_gather_object(nodes, node)
    return nodes if all(nodes) else []


def _backbone_lr(optimizer, scale: float) -> float:
    """The pretrained layers' current learning rate, read off the optimizer's groups (see
    `build_optimizer`: the head's group first, then the backbone's)."""
    groups = optimizer.param_groups
    if len(groups) > 1:
        return groups[1]["lr"]
    return groups[0]["lr"] if scale == 1.0 else 0.0  # one group: all at lr, or a linear probe


def _injected_fault(epoch: int) -> None:
    """Fault injection for resilience tests: ``SAMTUNE_FAULT_KILL_EPOCH=k`` SIGKILLs this worker
    process right after epoch k's checkpoint was reported (once per trial: a restarted worker
    resumes after epoch k and never reports k again); ``SAMTUNE_FAULT_RAISE_EPOCH=k`` raises
    there instead, as a bug in a trial would."""
    if os.environ.get("SAMTUNE_FAULT_KILL_EPOCH") == str(epoch):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SAMTUNE_FAULT_RAISE_EPOCH") == str(epoch):
        raise RuntimeError(f"injected fault after epoch {epoch} (SAMTUNE_FAULT_RAISE_EPOCH)")


# ----------------------------------------------------------------------------- entry points
def fit(config: dict[str, Any], report: Callable[[dict], None] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        on_end: Callable[[nn.Module], None] | None = None, *, alone: bool = False) -> dict[str, Any]:
    """Train one trial in this process (one worker, no Ray) and return the last epoch's metrics.

    `report` receives each epoch's metrics. With `checkpoint_dir`, a checkpoint is written there
    every epoch and a later call with the same folder resumes after the last finished epoch
    (a finished or diverged run returns its last metrics without training again).
    `on_end` receives the trained model (unwrapped) after the last epoch, e.g. to save weights.
    `alone=True` trains in this process even when it is one rank of an initialised
    `torch.distributed` group, without any collective and without waiting for the other ranks
    (a pretraining stage inside one worker of a data-parallel trial, `samtune.weights.pretrain`);
    on CUDA it uses this worker's device.
    Raises `TrialConfigError` for impossible settings, and for `workers` > 1 (use `run_trial` or
    `TorchTrainer(train_loop_per_worker, ...)`).
    """
    cfg = resolve_config(config)
    if cfg["workers"] != 1:
        raise TrialConfigError(f"fit() trains in this process: workers must be 1, got {cfg['workers']};"
                               " run several workers through run_trial or TorchTrainer")
    session = _LocalSession(report, None if checkpoint_dir is None else str(checkpoint_dir), alone=alone)
    if session.world_size != 1:
        raise TrialConfigError("fit() trains one process, but torch.distributed is initialised with "
                               f"{session.world_size} ranks; call train_loop_per_worker on every rank")
    return _train(cfg, session, on_end)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: trains this worker's shard, reports every epoch.

    Under `TorchTrainer` the worker count is the trainer's `ScalingConfig(num_workers=...)`
    (the config's `workers` is overridden by it). Resumes from `ray.train.get_checkpoint()` when
    Ray Train restarts the worker group. Outside Ray Train it runs in this process, as one rank of
    an initialised `torch.distributed` group if there is one (torchrun), without reporting.
    Raises `TrialConfigError` for impossible settings (e.g. a batch that does not split over the
    workers).
    """
    session: _Session = _RaySession(sys.modules["ray.train"]) if _in_ray_train() else _LocalSession(None, None)
    _train(config, session)


def run_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable of every sweep trial.

    `workers == 1`: the loop runs in the trial process, reporting metrics and a checkpoint to Tune
    (a restarted trial resumes from `tune.get_checkpoint()`). `workers > 1`: a `TorchTrainer` with
    that many workers runs inside the trial (the trial itself holds `trial_driver_resources`;
    the workers' resources come from `worker_resources`); `TuneReportCallback` forwards every epoch's
    metrics (rank 0's, plus `checkpoint_path`) so ASHA can stop it, and the trainer's run folder
    inside the trial folder holds its checkpoints, so a restarted trial resumes there.
    A finetuning trial whose `finetune_source` names a dataset pretrains inside its workers, each
    alone and waiting for the first one's cached file (`samtune.weights.pretrain`), so the
    pretraining runs where the trial's GPUs are rather than in this 1-CPU trial process.
    Raises `TrialConfigError` for impossible settings or a worker group the cluster can never hold.
    """
    import ray.tune

    cfg = resolve_config(config)
    if cfg["workers"] == 1:
        _train(cfg, _RaySession(ray.tune))
        return
    _run_workers(cfg)


# Ray's marker of the head node, a resource of 1 only that node has.
HEAD_NODE = "node:__internal_head__"


def trial_driver_resources(cluster: dict[str, float]) -> dict[str, float]:
    """Tune resources of a multi-worker trial's own process, on a cluster of these totals.

    It only waits on its workers (as Ray Train's controller, which holds no CPU either), so it
    holds no CPU and is pinned to the head node: the one node whose loss ends the cluster anyway.
    A trial process lost with a worker node would leave its worker group's placement group held
    (Ray ties it to the sweep's job, not to that process), and the restarted trial could never
    place its workers. A cluster without the head marker gets a token CPU share instead (Tune
    places nothing that asks for nothing).
    """
    if cluster.get(HEAD_NODE):
        return {"cpu": 0.0, "gpu": 0.0, HEAD_NODE: 0.001}
    return {"cpu": 0.01, "gpu": 0.0}


def worker_resources(cfg: dict[str, Any], cluster_cpus: float | None = None,
                     cluster_gpus: float | None = None,
                     nodes: list[dict[str, float]] | None = None,
                     driver_cpu: float = 0.0) -> dict[str, float]:
    """Ray resources of one training worker of a multi-worker trial: {"CPU": c} (+ {"GPU": g}).

    CPUs: `cpus_per_worker`, else what fits beside the trial's driver (`driver_cpu`, see
    `trial_driver_resources`), at most 1 each, in steps of 0.1 (1 each for 2 workers on 2 cores,
    or one per node on two 1-CPU nodes). GPUs (`use_gpu`): `gpus_per_worker`, else 1 each, or an
    equal share when the cluster has fewer GPUs than workers.

    The cluster totals and `nodes` (each alive node's resources, {"CPU": ..., "GPU": ...})
    default to the connected Ray cluster's (`ray.cluster_resources()`, `ray.nodes()`); with the
    totals given and no `nodes`, the cluster is taken as one node holding them. Raises
    `TrialConfigError` when the request can never be placed: more than the cluster totals, one
    worker larger than any single node, or more workers than the nodes hold one by one (a worker
    never spans nodes; Ray Train would otherwise wait, and retry, forever).
    """
    if cluster_cpus is None or (cfg["use_gpu"] and cluster_gpus is None):
        import ray

        total = ray.cluster_resources()
        cluster_cpus = float(total.get("CPU", 0.0)) if cluster_cpus is None else cluster_cpus
        cluster_gpus = float(total.get("GPU", 0.0)) if cluster_gpus is None else cluster_gpus
        if nodes is None:
            nodes = [{"CPU": float(n["Resources"].get("CPU", 0.0)), "GPU": float(n["Resources"].get("GPU", 0.0))}
                     for n in ray.nodes() if n.get("Alive")]
    if nodes is None:
        nodes = [{"CPU": cluster_cpus, "GPU": cluster_gpus or 0.0}]
    workers = cfg["workers"]
    per = cfg["cpus_per_worker"]
    if per is None:
        per = math.floor(max(0.1, min(1.0, (cluster_cpus - driver_cpu) / workers)) * 10 + 1e-9) / 10
    if not per > 0:
        raise TrialConfigError(f"cpus_per_worker must be > 0, got {per!r}")
    if driver_cpu + per * workers > cluster_cpus + 1e-9:
        held = f" (and {driver_cpu:g} for the trial's driver)" if driver_cpu else ""
        raise TrialConfigError(
            f"{workers} workers x {per:g} CPU need {per * workers:g} CPUs{held}, but the Ray cluster has "
            f"{cluster_cpus:g}; lower workers or cpus_per_worker")
    resources = {"CPU": per}
    gpu = 0.0
    if cfg["use_gpu"]:
        if not cluster_gpus:
            raise TrialConfigError("use_gpu=True but the Ray cluster has no GPU")
        gpu = cfg["gpus_per_worker"]
        if gpu is None:
            gpu = 1.0 if cluster_gpus >= workers else math.floor(cluster_gpus / workers * 100) / 100
        if not gpu > 0 or (gpu > 1 and not float(gpu).is_integer()):
            raise TrialConfigError(f"gpus_per_worker must be a fraction in (0, 1] or a whole number, got {gpu!r}")
        if gpu * workers > cluster_gpus + 1e-9:
            raise TrialConfigError(f"{workers} workers x {gpu:g} GPU need {gpu * workers:g} GPUs, but the "
                                   f"Ray cluster has {cluster_gpus:g}; lower workers or gpus_per_worker")
        resources["GPU"] = gpu
    _check_placement(workers, per, gpu, nodes)
    return resources


def _worker_slots(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of (cpus, gpus) one node holds. A fractional GPU share must fit within
    one GPU, so a node of G GPUs holds G x floor(1 / share) of them."""
    slots = math.floor(node.get("CPU", 0.0) / cpus + 1e-9)
    if gpus > 0:
        whole = math.floor(node.get("GPU", 0.0) + 1e-9)
        if gpus >= 1:
            by_gpu = math.floor(node.get("GPU", 0.0) / gpus + 1e-9)
        else:
            by_gpu = whole * math.floor(1 / gpus + 1e-9)
        slots = min(slots, by_gpu)
    return max(0, int(slots))


def _check_placement(workers: int, cpus: float, gpus: float, nodes: list[dict[str, float]]) -> None:
    want = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    if not nodes:
        raise TrialConfigError("the Ray cluster has no alive node to place training workers on")
    if not any(_worker_slots(n, cpus, gpus) for n in nodes):
        largest_cpu = max(n.get("CPU", 0.0) for n in nodes)
        largest_gpu = max(n.get("GPU", 0.0) for n in nodes)
        raise TrialConfigError(
            f"one training worker needs {want} on a single node, but the largest node has "
            f"{largest_cpu:g} CPU" + (f" and {largest_gpu:g} GPU" if gpus else "")
            + "; lower cpus_per_worker" + (" or gpus_per_worker" if gpus else ""))
    slots = sum(_worker_slots(n, cpus, gpus) for n in nodes)
    if slots < workers:
        raise TrialConfigError(
            f"{workers} workers of {want} each do not fit: the Ray cluster's {len(nodes)} node(s) "
            f"hold {slots} such workers (a worker never spans nodes); lower workers, "
            "cpus_per_worker" + (" or gpus_per_worker" if gpus else ""))


def distributed_backend(cfg: dict[str, Any], resources: dict[str, float]) -> str:
    """`backend`, else NCCL when every worker has a GPU of its own and gloo otherwise (CPU
    workers, or workers sharing a GPU, which NCCL refuses)."""
    if cfg["backend"] is not None:
        return cfg["backend"]
    return "nccl" if cfg["use_gpu"] and resources.get("GPU", 0) >= 1 else "gloo"


def _run_workers(cfg: dict[str, Any]) -> None:
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_dir = ray.tune.get_context().get_trial_dir()
    resources = _trial_worker_resources(cfg, trial_dir)
    failure = FailureConfig(max_failures=cfg["max_failures"])
    # Ray Train retries a worker group it cannot place without end by default; a trial whose
    # workers do not fit (a node gone, resources held elsewhere) fails after one bounded wait,
    # which Ray Train reads from this variable in the trial process (it hands it to its
    # controller). A worker lost mid-trial still restarts the group up to `max_failures` times.
    os.environ[_START_TIMEOUT_VAR] = f"{cfg['placement_timeout_s']:g}"
    if hasattr(failure, "controller_failure_limit"):
        failure.controller_failure_limit = 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend=distributed_backend(cfg, resources)),
        scaling_config=ScalingConfig(num_workers=cfg["workers"], use_gpu=cfg["use_gpu"],
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name="workers",
            # Inside the trial folder: the same trial restarted finds its run and resumes it.
            storage_path=os.path.abspath(trial_dir),
            failure_config=failure,
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # resuming needs the latest only
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        if type(getattr(exc, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
            raise WorkerPlacementError(_placement_message(cfg, resources)) from None
        raise


_START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _held_cpu() -> float:
    """The CPUs this trial's own process holds: what the sweep gives it (`trial_driver_resources`)
    or what a user's own Tuner does, so its workers are sized to fit beside it either way."""
    import ray.tune

    try:
        return float(ray.tune.get_context().get_trial_resources().required_resources.get("CPU", 0.0))
    except Exception:  # noqa: BLE001  not inside a Tune trial after all
        import ray

        return trial_driver_resources(ray.cluster_resources())["cpu"]


def _trial_worker_resources(cfg: dict[str, Any], trial_dir: str) -> dict[str, float]:
    """The trial's worker resources: sized to the cluster when it first starts, then kept in its
    folder. A trial restarted after a node loss asks for what it first ran with: sized again to a
    smaller cluster it would shrink its workers' CPUs, or share GPUs over gloo instead of NCCL,
    and its speed (and backend) would change with the cluster it happened to find."""
    import json

    path = os.path.join(trial_dir, "worker_resources.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    resources = worker_resources(cfg, driver_cpu=_held_cpu())
    os.makedirs(trial_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(resources, f)
    os.replace(path + ".tmp", path)
    return resources


class WorkerPlacementError(RuntimeError):
    """A trial's worker group could not be placed on the Ray cluster in the time allowed."""


def _placement_message(cfg: dict[str, Any], resources: dict[str, float]) -> str:
    import ray

    per = " + ".join(f"{v:g} {k}" for k, v in resources.items())
    wait = cfg["placement_timeout_s"]
    try:
        free = ", ".join(f"{v:g} {k}" for k, v in sorted(ray.available_resources().items())
                         if k in ("CPU", "GPU")) or "nothing"
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # noqa: BLE001  the cluster itself is gone: say what was asked
        free, nodes = "unknown", 0
    return (f"{cfg['workers']} training workers of {per} each could not be placed within "
            f"placement_timeout_s={wait:g} s: "
            f"the Ray cluster has {nodes} alive node(s) and {free} free; bring the missing capacity "
            "back, or lower workers, cpus_per_worker or gpus_per_worker")

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

import math
import os
from typing import Any

import torch
from torch import nn

from samtune.models.heads import param_groups
from samtune.optim import msharpness
from samtune.optim.sam import SAM
from samtune.trial.config import TrialConfigError, _variant
from samtune.trial.session import _in_ray_train


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


def _uses_conv(model: nn.Module) -> bool:
    return any(isinstance(mod, nn.Conv2d) for mod in model.modules())


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
        self._ddp, self._own_at_start = 0, msharpness.own_all_reduces

    def count(self) -> int:
        return self._ddp + msharpness.own_all_reduces - self._own_at_start


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _backbone_lr(optimizer, scale: float) -> float:
    """The pretrained layers' current learning rate, read off the optimizer's groups (see
    `build_optimizer`: the head's group first, then the backbone's)."""
    groups = optimizer.param_groups
    if len(groups) > 1:
        return groups[1]["lr"]
    return groups[0]["lr"] if scale == 1.0 else 0.0  # one group: all at lr, or a linear probe

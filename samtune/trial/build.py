"""What a trial trains with, built from its config: the device, the optimizer (SAM around its base
optimizer), the LR schedule, and the DistributedDataParallel wrapping and process groups of a
data-parallel trial.
"""

from __future__ import annotations

import math
import os
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from samtune.models.heads import param_groups
from samtune.optim import msharpness
from samtune.optim.sam import SAM
from samtune.trial.config import Perturbation, TrialConfigError, variant_from_settings
from samtune.trial.session import in_ray_train


def trial_device(cfg: dict[str, Any], rank: int) -> torch.device:
    if not cfg["use_gpu"]:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrialConfigError("use_gpu=True but CUDA is not available on this worker")
    if in_ray_train():
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:  # one GPU per local rank, shared round-robin
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    if cfg["precision"] == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrialConfigError(
            f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16 support; use 'fp16' or 'fp32'"
        )
    return device


def build_optimizer(
    cfg: dict[str, Any], model: nn.Module, total_steps: int, backbone_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """The trial's optimizer: the plain base optimizer for `sgd`, SAM around it for `sam`/`asam`
    (following the config's `sam_variant`, planned over `total_steps`).

    `backbone_lr_scale` != 1 (finetuning): two parameter groups, the classification head at `lr`
    (first group) and every other parameter at `lr * backbone_lr_scale`; 0 leaves the backbone
    out of the optimizer (`samtune.models.heads.param_groups`). The LR schedule scales both alike.

    >>> from samtune.trial.config import resolve_config
    >>> type(build_optimizer(resolve_config({"optimizer": "sam"}), nn.Linear(4, 2), total_steps=10)).__name__
    'SAM'
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
    variant = variant_from_settings(cfg, total_steps)
    return SAM(
        params,
        base_optimizer=base,
        rho=cfg["rho"],
        adaptive=cfg["optimizer"] == "asam",
        eta=cfg["eta"],
        variant=None if variant.name == "full" else variant,
        **kwargs,
    )


def build_schedule(
    cfg: dict[str, Any], optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
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


def uses_conv(model: nn.Module) -> bool:
    return any(isinstance(mod, nn.Conv2d) for mod in model.modules())


def wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    if world == 1:
        return model
    if in_ray_train():
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)
    # a plain torch.distributed job outside Ray (torchrun)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def perturbation_groups(plan: Perturbation, rank: int) -> dist.ProcessGroup | None:
    """This rank's process group for averaging first gradients (k consecutive ranks), or None.

    Every rank must create every group, in the same order (a collective of the default group)."""
    if plan.workers_per_eps == 1 or plan.sync_all:
        return None
    k = plan.workers_per_eps
    mine: dist.ProcessGroup | None = None
    for start in range(0, plan.workers, k):
        group = dist.new_group(list(range(start, start + k)))
        if start <= rank < start + k:
            mine = cast(dist.ProcessGroup, group)  # new_group hands the non-member sentinel to the others only
    return mine


class RoundCounter:
    """Gradient all-reduce rounds of this worker's training steps: DDP's (one per reduction; its
    last bucket closes it) plus those SAM steps make themselves (`sam.own_all_reduces`). The
    metric sums and divergence checks are not counted: they are the same whatever SAM does."""

    def __init__(self, model: nn.Module):
        self._ddp = 0
        self._own_at_start = 0

        def counting(state: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            self._ddp += int(bucket.is_last())
            return default_hooks.allreduce_hook(state, bucket)  # type: ignore[arg-type]  # torch's hint omits None, the default group DDP passes

        # DDP checks a hook's annotations against the real classes, and this module's are strings
        # (postponed evaluation): the checked ones are handed over evaluated.
        counting.__annotations__.update(bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]})
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.register_comm_hook(None, counting)

    def start(self) -> None:
        self._ddp, self._own_at_start = 0, msharpness.own_all_reduces

    def count(self) -> int:
        return self._ddp + msharpness.own_all_reduces - self._own_at_start


def unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def backbone_lr(optimizer: torch.optim.Optimizer, scale: float) -> float:
    """The pretrained layers' current learning rate, read off the optimizer's groups (see
    `build_optimizer`: the head's group first, then the backbone's)."""
    groups = optimizer.param_groups
    if len(groups) > 1:
        return groups[1]["lr"]
    return groups[0]["lr"] if scale == 1.0 else 0.0  # one group: all at lr, or a linear probe

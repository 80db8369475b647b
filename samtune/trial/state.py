"""One worker's trial between its steps: `setup` builds it from the config (model, optimizer,
schedule, the data resident on the device), `restore` continues it from the session's
checkpoint, and `checkpoint` is what every epoch's report saves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from samtune.data.scenarios import Scenario, build_scenario
from samtune.models.heads import freeze_batchnorm_stats
from samtune.trial.build import (
    RoundCounter,
    build_optimizer,
    build_schedule,
    perturbation_groups,
    trial_device,
    unwrap_ddp,
    uses_conv,
    wrap_ddp,
)
from samtune.trial.config import (
    TRAIN_EVAL_SUBSET,
    Perturbation,
    TrialConfigError,
    perturbation_plan,
    resolve_config,
)
from samtune.trial.placement import node_placement
from samtune.trial.seeding import fixed_train_order
from samtune.trial.session import Session

log = logging.getLogger(__name__)


class Examples(NamedTuple):
    """Examples on the training device: uint8 inputs, the labels trained on, the clean labels."""

    x: Tensor
    y: Tensor
    y_true: Tensor


@dataclass
class TrialState:
    """What one worker's trial holds: built by `setup`, advanced by every epoch."""

    cfg: dict[str, Any]
    session: Session
    plan: Perturbation
    device: torch.device
    scenario: Scenario
    model: nn.Module  # what trains: compiled and DDP-wrapped where that applies
    module: nn.Module  # the plain module: its state dict is the checkpoint's, whatever wraps it
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    steps: int  # training steps per epoch
    train: Examples
    fixed: Examples  # the fixed training subset `train_error` is measured on
    norm: tuple[Tensor, Tensor]  # on the device once: from tuples, each batch would copy them there
    channels_last: bool
    autocast: torch.autocast
    step_settings: dict[str, Any]  # `sam_step`'s keyword arguments on this worker
    rounds: RoundCounter | None
    placement: list[str]
    start_epoch: int = 1
    train_time: float = 0.0
    compute_time: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world_size

    @property
    def data_rank(self) -> int:
        """This worker's data shard: its rank, or its pair's index when SAMPa pairs the workers
        (both workers of a pair train on the same batches)."""
        return self.rank // 2 if self.plan.paired else self.rank

    @property
    def data_world(self) -> int:
        return self.plan.data_shards if self.world > 1 else 1

    @property
    def eval_model(self) -> nn.Module:
        return unwrap_ddp(self.model)  # no collective inside an evaluation forward


def setup(config: dict[str, Any], session: Session, initial_state: dict[str, Tensor] | None = None) -> TrialState:
    """Build this worker's trial from its config: the scenario, the model (placed, compiled and
    wrapped for data parallelism as the config asks), optimizer, schedule and data on the device.

    Raises `TrialConfigError` for impossible settings, such as a batch larger than the data.
    """
    cfg = resolve_config(config)
    rank, world = session.rank, session.world_size
    if cfg["workers"] != world:
        # The sharding and the per-worker batch follow the actual worker group.
        cfg = resolve_config({**cfg, "workers": world})
    plan = perturbation_plan(cfg)
    device = trial_device(cfg, rank)
    scenario = build_scenario(cfg, initial_state=initial_state)
    # Seeded after the scenario: building it may pretrain a finetune source (which draws from the
    # global generator), and the head's initialisation must not depend on whether it did.
    torch.manual_seed(cfg["seed"])
    module, channels_last = _build_module(cfg, scenario, device)
    model = _wrap_for_training(cfg, module, device, world)
    rounds = RoundCounter(model) if world > 1 else None
    perturbation_group = perturbation_groups(plan, rank) if world > 1 else None
    steps = _steps_per_epoch(cfg, plan, len(scenario.train_y), world)
    optimizer = build_optimizer(
        cfg, module, total_steps=cfg["epochs"] * steps, backbone_lr_scale=scenario.backbone_lr_scale
    )
    schedule = build_schedule(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler("cuda") if cfg["precision"] == "fp16" else None
    norm = (
        torch.as_tensor(scenario.mean, dtype=torch.float32, device=device),
        torch.as_tensor(scenario.std, dtype=torch.float32, device=device),
    )
    if cfg["optimizer"] != "sgd" and rank == 0:
        log.info("SAM perturbation %s", plan.describe())
    train, fixed = _resident_examples(cfg, scenario, device)
    return TrialState(
        cfg=cfg,
        session=session,
        plan=plan,
        device=device,
        scenario=scenario,
        model=model,
        module=module,
        optimizer=optimizer,
        schedule=schedule,
        scaler=scaler,
        steps=steps,
        train=train,
        fixed=fixed,
        norm=norm,
        channels_last=channels_last,
        autocast=_autocast(cfg, device),
        step_settings=_step_settings(cfg, plan, perturbation_group, scaler),
        rounds=rounds,
        placement=node_placement(world),
    )


def _step_settings(
    cfg: dict[str, Any],
    plan: Perturbation,
    perturbation_group: torch.distributed.ProcessGroup | None,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """`sam_step`'s keyword arguments on this worker: its m-sharpness groups, how its perturbation
    is shared under DDP, gradient clipping and the fp16 loss scaler."""
    return {
        "m": plan.m if plan.groups_per_worker > 1 else None,
        "vectorize": cfg["m_vmap"],
        "sync_perturbation": plan.sync_all,
        "perturbation_group": perturbation_group,
        "max_grad_norm": cfg["max_grad_norm"],
        "scaler": scaler,
    }


def _build_module(cfg: dict[str, Any], scenario: Scenario, device: torch.device) -> tuple[nn.Module, bool]:
    """The scenario's model on `device`, and whether it (and its batches) use channels_last."""
    model = scenario.build_model(cfg["model"], cfg["norm"]).to(device)
    if cfg["freeze_bn"] or scenario.freeze_bn:
        freeze_batchnorm_stats(model)
    channels_last = cfg["channels_last"]
    if channels_last is None:
        channels_last = device.type == "cuda" and len(scenario.input_shape) == 3 and uses_conv(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last


def _wrap_for_training(cfg: dict[str, Any], module: nn.Module, device: torch.device, world: int) -> nn.Module:
    model = module
    if cfg["compile"]:
        # Compiled before DDP wraps it, so sam_step still sees a DDP model (no_sync) around it.
        # A module compiles to a module (OptimizedModule), which torch.compile's hint leaves a plain Callable.
        model = cast(nn.Module, torch.compile(model, backend=cfg["compile_backend"]))
    return wrap_ddp(model, device, world)


def _steps_per_epoch(cfg: dict[str, Any], plan: Perturbation, n_train: int, world: int) -> int:
    steps = (n_train // (plan.data_shards if world > 1 else 1)) // plan.per_worker_batch
    if steps < 1:
        raise TrialConfigError(
            f"batch_size={cfg['batch_size']} is larger than the {n_train} training examples of this scenario"
        )
    return steps


def _resident_examples(cfg: dict[str, Any], scenario: Scenario, device: torch.device) -> tuple[Examples, Examples]:
    """The training set on the device, uint8 and normalised per batch (4x less memory than
    float), and the fixed subset of it `train_error` is measured on."""
    train = Examples(scenario.train_x.to(device), scenario.train_y.to(device), scenario.train_y_true.to(device))
    fixed = fixed_train_order(len(train.y), cfg["seed"])[:TRAIN_EVAL_SUBSET].to(device)
    return train, Examples(train.x[fixed], train.y[fixed], train.y_true[fixed])


def _autocast(cfg: dict[str, Any], device: torch.device) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["precision"])
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def restore(state: TrialState) -> None:
    """Continue from the session's checkpoint, where it has one: weights, optimizer (with SAM's
    base optimizer and variant state), schedule, loss scale, the cumulative times, the last
    metrics, and the epoch after the checkpoint's as the next one to train."""
    saved = state.session.load()
    if saved is None:
        return
    state.module.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.schedule.load_state_dict(saved["schedule"])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.start_epoch, state.train_time, state.last = saved["epoch"] + 1, saved["train_time_s"], saved["metrics"]
    state.compute_time = saved.get("compute_time_s", state.train_time)


def checkpoint(state: TrialState, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What `restore` reads back: the trial as it stands after epoch `epoch`."""
    return {
        "model": state.module.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else {},
        "epoch": epoch,
        "train_time_s": state.train_time,
        "compute_time_s": state.compute_time,
        "metrics": dict(metrics),
    }

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
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from samtune.data.scenarios import build_scenario
from samtune.data.transforms import augment_batch, to_float
from samtune.models.heads import freeze_batchnorm_stats
from samtune.optim.step import sam_step
from samtune.trial.build import (
    _backbone_lr,
    _device,
    _RoundCounter,
    _unwrap_ddp,
    _uses_conv,
    _wrap_ddp,
    build_optimizer,
    build_schedule,
)
from samtune.trial.config import (
    TRAIN_EVAL_SUBSET,
    TrialConfigError,
    perturbation_plan,
    resolve_config,
)
from samtune.trial.epoch import (
    _all_reduce,
    _epoch_order,
    _evaluate,
    _fixed_train_order,
    _injected_fault,
    _measure_sharpness,
    _perturbation_groups,
    _seed_epoch,
    _sync_buffers,
)
from samtune.trial.session import _Session

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the loop
def run(config: dict[str, Any], session: _Session, on_end: Callable[[nn.Module], None] | None = None,
        initial_state: dict[str, Tensor] | None = None) -> dict[str, Any]:
    cfg = resolve_config(config)
    rank, world = session.rank, session.world_size
    if cfg["workers"] != world:
        # The sharding and the per-worker batch follow the actual worker group.
        cfg = resolve_config({**cfg, "workers": world})
    plan = perturbation_plan(cfg)
    device = _device(cfg, rank)

    scenario = build_scenario(cfg, initial_state=initial_state)
    # Seeded after the scenario: building it may pretrain a finetune source (which draws from the
    # global generator), and the head's initialisation must not depend on whether it did.
    torch.manual_seed(cfg["seed"])
    model = scenario.build_model(cfg["model"], cfg["norm"]).to(device)
    if cfg["freeze_bn"] or scenario.freeze_bn:

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


# ----------------------------------------------------------------------------- entry points

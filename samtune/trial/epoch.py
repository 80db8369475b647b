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

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from samtune.data.transforms import to_float
from samtune.sharpness.measures import measure_sharpness
from samtune.trial.config import Perturbation
from samtune.trial.placement import _memory_share


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

"""One epoch of training on this worker: its share of the epoch's shuffle, one SAM (or SGD) step
per batch, and a divergence check every few steps that every worker decides alike.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from samtune.data.transforms import augment_batch, to_float
from samtune.optim.step import sam_step
from samtune.trial.seeding import augmentation_generator, epoch_order, seed_epoch
from samtune.trial.state import TrialState

#: Training steps between two divergence checks.
DIVERGENCE_CHECK_EVERY = 16


def all_reduce(values: Tensor, world_size: int) -> Tensor:
    if world_size > 1:
        dist.all_reduce(values)
    return values


def train_epoch(state: TrialState, epoch: int) -> dict[str, Any]:
    """Train epoch `epoch`: this worker takes every world-th example of the epoch's global
    shuffle, cut to whole batches.

    Returns the epoch's training metrics: running means over its steps (train mode, augmented
    batches, while the weights move), its seconds and the cumulative ones, and `diverged`; a
    diverged epoch (stopped at a divergence check) has only its times and `diverged` = 1.
    """
    cfg, world, device = state.cfg, state.world, state.device
    # The shard: every world-th example, or every pair's when SAMPa pairs the workers (both
    # workers of a pair draw the same batches and augmentations).
    rank, shards = state.data_rank, state.data_world
    state.model.train()
    started = time.perf_counter()
    seed_epoch(cfg["seed"], epoch, rank)
    batch = state.plan.per_worker_batch
    order = epoch_order(len(state.train.y), cfg["seed"], epoch)[rank::shards][: state.steps * batch]
    order = order.to(device)
    gen = augmentation_generator(cfg["seed"], epoch, rank, device)
    # Every batch holds `batch` examples: a tensor made once, not a host-to-device copy per step.
    batch_n = torch.tensor(float(batch), dtype=torch.float64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct noisy, true, n
    diverged = False
    if state.rounds is not None:
        state.rounds.start()
    for step in range(state.steps):
        loss = _train_step(state, order[step * batch : (step + 1) * batch], gen, sums, batch_n)
        # A cheap divergence check every few steps (one host sync), always at the end; every
        # worker takes the same decision, so none is left waiting in a collective.
        check = step % DIVERGENCE_CHECK_EVERY == DIVERGENCE_CHECK_EVERY - 1 or step == state.steps - 1
        if check and _loss_diverged(state, loss):
            diverged = True
            break
    sums = all_reduce(sums, world)
    epoch_time = time.perf_counter() - started
    state.train_time += epoch_time
    if diverged:
        return {"epoch_time_s": epoch_time, "train_time_s": state.train_time, "diverged": 1}
    n_seen = float(sums[3])
    return {
        "train_loss": float(sums[0]) / n_seen,
        "train_acc_noisy": float(sums[1]) / n_seen,
        "train_acc_true": float(sums[2]) / n_seen,
        "epoch_time_s": epoch_time,
        "samples_per_s": n_seen / epoch_time,
        "train_time_s": state.train_time,
        "diverged": 0,
    }


def _train_step(state: TrialState, idx: Tensor, gen: torch.Generator, sums: Tensor, batch_n: Tensor) -> Tensor:
    """One optimizer step on the examples `idx`, adding its loss and correct predictions (against
    the labels trained on and the clean ones) to `sums`; returns the batch's loss."""
    xb = state.train.x[idx]
    if state.scenario.augment:
        xb = augment_batch(xb, gen)
    xb = to_float(xb, *state.norm)
    if state.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    yb = state.train.y[idx]
    with state.autocast:
        loss, logits = sam_step(state.model, F.cross_entropy, xb, yb, state.optimizer, **state.step_settings)
    state.schedule.step()
    pred = logits.argmax(1)
    sums += torch.stack(
        [
            loss.double() * len(yb),
            (pred == yb).sum().double(),
            (pred == state.train.y_true[idx]).sum().double(),
            batch_n,
        ]
    )
    return loss


def _loss_diverged(state: TrialState, loss: Tensor) -> bool:
    """Whether the loss went non-finite or above `divergence_loss` on any worker (a collective)."""
    value = float(loss)
    bad = torch.tensor([float(not math.isfinite(value) or value > state.cfg["divergence_loss"])], device=state.device)
    return all_reduce(bad, state.world).item() > 0

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
import os
import sys
from typing import Any, Callable

from torch import nn

from samtune.trial.config import TrialConfigError, resolve_config
from samtune.trial.loop import run
from samtune.trial.pretrain import pretrained_state
from samtune.trial.session import _in_ray_train, _LocalSession, _RaySession, _Session

log = logging.getLogger(__name__)


def train(config: dict[str, Any], session: _Session,
          on_end: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """The trial's steps after its pretraining step: a finetuning trial whose ``finetune_source``
    names a dataset gets the pretrained weights first (`samtune.trial.pretrain`, cached), then
    `samtune.trial.loop.run` trains. Returns the last epoch's metrics."""
    cfg = resolve_config(config)
    return run(cfg, session, on_end, initial_state=pretrained_state(cfg))


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
    return train(cfg, session, on_end)


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
    train(config, session)

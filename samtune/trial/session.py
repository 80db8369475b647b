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
import sys
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist


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

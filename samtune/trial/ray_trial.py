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

from samtune.trial.config import resolve_config
from samtune.trial.entry import train, train_loop_per_worker
from samtune.trial.placement import (
    _START_TIMEOUT_VAR,
    WorkerPlacementError,
    _placement_message,
    _trial_worker_resources,
    distributed_backend,
)
from samtune.trial.session import _RaySession


def run_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable of every sweep trial.

    `workers == 1`: the loop runs in the trial process, reporting metrics and a checkpoint to Tune
    (a restarted trial resumes from `tune.get_checkpoint()`). `workers > 1`: a `TorchTrainer` with
    that many workers runs inside the trial (the trial itself holds `trial_driver_resources`;
    the workers' resources come from `worker_resources`); `TuneReportCallback` forwards every epoch's
    metrics (rank 0's, plus `checkpoint_path`) so ASHA can stop it, and the trainer's run folder
    inside the trial folder holds its checkpoints, so a restarted trial resumes there.
    A finetuning trial whose `finetune_source` names a dataset pretrains inside its workers, each
    alone and waiting for the first one's cached file (`samtune.trial.pretrain`), so the
    pretraining runs where the trial's GPUs are rather than in this 1-CPU trial process.
    Raises `TrialConfigError` for impossible settings or a worker group the cluster can never hold.
    """
    import ray.tune

    cfg = resolve_config(config)
    if cfg["workers"] == 1:
        train(cfg, _RaySession(ray.tune))
        return
    _run_workers(cfg)


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

"""One trial: a config in, per-epoch metrics out; in this process (`fit`), as a Ray Train worker
(`train_loop_per_worker`) or as a Ray Tune trial (`run_trial`).

One body, three ways in:

- `fit(config)`: in this process, no Ray needed (one worker). Returns the last epoch's metrics.
- `train_loop_per_worker(config)`: the Ray Train worker function, for
  `TorchTrainer(train_loop_per_worker, train_loop_config=..., scaling_config=...)` in the sweep or
  in a user's own Ray cluster (it also runs under a plain `torch.distributed` job, e.g. torchrun).
- `run_trial(config)`: the Ray Tune function trainable the sweep runs for every trial: the loop in
  the trial process for one worker; for several, a `TorchTrainer` started inside the trial (Ray
  Train V2's way of nesting Train in Tune) whose `TuneReportCallback` passes every epoch's metrics
  back to Tune, so ASHA sees every epoch either way.

The body (`samtune.trial.loop.run`) is a loop over named steps: `setup` builds the worker's
model, optimizer, schedule and resident data and `restore` continues from a checkpoint
(`samtune.trial.state`); every epoch `train_epoch` trains (`samtune.trial.epoch`), `evaluate` and
`measure` measure (`samtune.trial.evaluate`), and `report` hands the metrics and a checkpoint to
the session (`samtune.trial.session`).

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

Every epoch reports its metrics and a checkpoint (model, optimizer including SAM's base
optimizer and variant state, LR schedule, fp16 loss scale, epoch, cumulative time). A resumed run
continues exactly where the checkpoint left it: all randomness (data order, augmentation, the
global torch generator used by dropout) is re-derived from (seed, epoch, rank) at every epoch
rather than carried in a generator (`samtune.trial.seeding`).

Per-epoch metrics: `samtune.contract.metrics.METRICS` names every one, when it is reported and
what it means. How they are measured:

- the training loss and accuracies are running means over the epoch's training steps, i.e. in
  train mode, on augmented batches, while the weights move;
- `train_error` is measured in eval mode at the end of the epoch on a fixed training subset (the
  first `TRAIN_EVAL_SUBSET` = 1,024 indices of a permutation seeded with `seed + 7919`, the same
  permutation whose first `sharpness_subset` indices the sharpness measures use), against the
  labels trained on, without augmentation; the flipped-label accuracies on the examples of that
  subset whose label the noise flipped, against the noisy and against the true label;
- validation and test error and loss: eval-mode top-1 error and mean cross-entropy;
- `lr` is the head's learning rate, `lr_backbone` (finetuning) the pretrained layers'
  (`lr x backbone_lr_scale`), both read off the optimizer after the epoch's last step;
- `compute_time_s` counts the trial's own epochs (training, evaluation and sharpness): what the
  trial costs without process start, data loading, reporting and checkpointing;
- `m_plan` says in words how m-sharpness was realised, `placement` (under Ray) holds each
  worker's Ray node id in rank order, both strings; `allreduce_per_step` is 1 for SGD and
  per-worker SAM, 2 for classic SAM's synced perturbation;
- `sharpness/<measure>`: `samtune.sharpness.measure_sharpness` by rank 0 on the sharpness subset
  (noisy labels), at the last epoch and every `sharpness_every` epochs.

A trial whose loss goes non-finite (or above `divergence_loss`) is *diverged*: it reports one last
result with `diverged=1` and the worst value of every metric a sweep can optimise
(`samtune.contract.metrics.worst_values`): a bad result for ASHA/Optuna whatever the sweep's
metric, not a crash. It leaves the non-finite values out, and ends.

GPU path (`use_gpu=True`): CUDA device per worker, NCCL when every worker has a GPU of its own and
gloo when workers share one (NCCL refuses two ranks on one device), `precision="bf16"` autocast
(where the device supports it) or `"fp16"` autocast with a `GradScaler` that unscales once per
SAM step, `channels_last` for convnets, and `compile=True` for `torch.compile`.

Offers: `fit` and `train_loop_per_worker` (entry), `run_trial` (ray_trial), `resolve_config`,
`perturbation_plan`, `Perturbation`, `TrialConfigError` (config), `worker_resources`,
`distributed_backend`, `WorkerPlacementError` (placement), `pretrain` and `pretrained_state`
(pretrain). Kept: the loop and its steps (loop, state, build, epoch, evaluate, session), the
finetuning start (probe), the random streams (seeding) and a trained model rebuilt outside its
trial from a checkpoint (export).
"""

from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

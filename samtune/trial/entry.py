"""Training one trial: `fit` in this process, `train_loop_per_worker` as a Ray Train worker (or
one rank of a plain `torch.distributed` job); both go through `train`, which first pretrains a
finetune source where the config names a dataset. The sweep's way in is
`samtune.trial.ray_trial.run_trial`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from samtune.trial.config import TrialConfigError, resolve_config
from samtune.trial.loop import run
from samtune.trial.pretrain import pretrained_state
from samtune.trial.session import LocalSession, RaySession, Session, in_ray_train


def train(
    config: dict[str, Any], session: Session, on_end: Callable[[nn.Module], None] | None = None
) -> dict[str, Any]:
    """The trial's steps after its pretraining step: a finetuning trial whose ``finetune_source``
    names a dataset gets the pretrained weights first (`samtune.trial.pretrain`, cached), then
    `samtune.trial.loop.run` trains. Returns the last epoch's metrics."""
    cfg = resolve_config(config)
    return run(cfg, session, on_end, initial_state=pretrained_state(cfg))


def fit(
    config: dict[str, Any],
    report: Callable[[dict], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    on_end: Callable[[nn.Module], None] | None = None,
    *,
    alone: bool = False,
) -> dict[str, Any]:
    """Train one trial in this process (one worker, no Ray) and return the last epoch's metrics.

    `report` receives each epoch's metrics. With `checkpoint_dir`, a checkpoint is written there
    every epoch and a later call with the same folder resumes after the last finished epoch
    (a finished or diverged run returns its last metrics without training again).
    `on_end` receives the trained model (unwrapped) after the last epoch, e.g. to save weights.
    `alone=True` trains in this process even when it is one rank of an initialised
    `torch.distributed` group, without any collective and without waiting for the other ranks
    (a pretraining stage inside one worker of a data-parallel trial, `samtune.trial.pretrain`);
    on CUDA it uses this worker's device.
    Raises `TrialConfigError` for impossible settings, and for `workers` > 1 (use `run_trial` or
    `TorchTrainer(train_loop_per_worker, ...)`).

    >>> seen = []
    >>> last = fit({"dataset": "digits", "epochs": 2, "data_subset": 256, "sharpness_measures": ()},
    ...            report=seen.append)
    >>> [m["epoch"] for m in seen], last["diverged"], 0.0 <= last["test_error"] <= 1.0
    ([1, 2], 0, True)
    """
    cfg = resolve_config(config)
    if cfg["workers"] != 1:
        raise TrialConfigError(
            f"fit() trains in this process: workers must be 1, got {cfg['workers']};"
            " run several workers through run_trial or TorchTrainer"
        )
    session = LocalSession(report, None if checkpoint_dir is None else str(checkpoint_dir), alone=alone)
    if session.world_size != 1:
        raise TrialConfigError(
            "fit() trains one process, but torch.distributed is initialised with "
            f"{session.world_size} ranks; call train_loop_per_worker on every rank"
        )
    return train(cfg, session, on_end)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: trains this worker's shard, reports every epoch.

    Under `TorchTrainer` the worker count is the trainer's `ScalingConfig(num_workers=...)`: the
    config's `workers` may be left out (it is taken from the worker group), and one that differs
    is refused before any compute. Resumes from `ray.train.get_checkpoint()` when
    Ray Train restarts the worker group. Outside Ray Train it runs in this process, as one rank of
    an initialised `torch.distributed` group if there is one (torchrun), without reporting.
    Raises `TrialConfigError` for impossible settings (e.g. a batch that does not split over the
    workers, or `workers` other than the worker group's size).

    Under Ray Train: ``TorchTrainer(train_loop_per_worker, train_loop_config=config,
    scaling_config=ScalingConfig(num_workers=2)).fit()``. Outside it, one process trains alone:

    >>> train_loop_per_worker({"dataset": "digits", "epochs": 1, "data_subset": 256,
    ...                        "sharpness_measures": ()})
    """
    session: Session = RaySession(sys.modules["ray.train"]) if in_ray_train() else LocalSession(None, None)
    train(with_worker_count(config, session.world_size), session)


def with_worker_count(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """`config` with ``workers`` = the worker group's size; `TrialConfigError` when it names
    another (the sharding, per-worker batch and m-sharpness all follow ``workers``).

    >>> with_worker_count({"epochs": 1}, 2)
    {'epochs': 1, 'workers': 2}
    >>> with_worker_count({"workers": 3}, 2)
    Traceback (most recent call last):
    ...
    samtune.trial.config.TrialConfigError: workers=3 in the trial config, but the worker group has 2 workers (num_workers); set workers to 2 or leave it out
    """
    workers = config.get("workers")
    if workers is not None and workers != world_size:
        raise TrialConfigError(
            f"workers={workers!r} in the trial config, but the worker group has {world_size} workers "
            f"(num_workers); set workers to {world_size} or leave it out"
        )
    return {**config, "workers": world_size}

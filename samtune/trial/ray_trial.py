"""The Ray Tune function trainable every sweep trial runs (`run_trial`): one worker trains in the
trial process; several run as a `TorchTrainer` started inside the trial, with their resources
kept for restarts and a bounded wait for their placement.
"""

from __future__ import annotations

import os
from typing import Any

from samtune.trial.config import resolve_config
from samtune.trial.entry import train, train_loop_per_worker
from samtune.trial.placement import (
    START_TIMEOUT_VAR,
    WorkerPlacementError,
    distributed_backend,
    placement_message,
    trial_worker_resources,
)
from samtune.trial.session import RaySession


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
        train(cfg, RaySession(ray.tune))
        return
    _run_workers(cfg)


def _workers_storage(trial_dir: str) -> dict[str, Any]:
    """Where the trial's worker group keeps its run: the trial's folder in the sweep's storage,
    so a trial restarted on another node finds it. In object storage that is the trial's folder
    in the bucket (the local trial folder is only this node's)."""
    import ray.tune

    storage = ray.tune.get_context().get_storage()
    fs = getattr(storage, "storage_filesystem", None)
    if storage is None or fs is None or getattr(fs, "type_name", "local") == "local":
        return {"storage_path": os.path.abspath(trial_dir)}
    return {"storage_path": storage.trial_fs_path, "storage_filesystem": fs}


def _run_workers(cfg: dict[str, Any]) -> None:
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_dir = ray.tune.get_context().get_trial_dir()
    resources = trial_worker_resources(cfg, trial_dir)
    failure = FailureConfig(max_failures=cfg["max_failures"])
    # Ray Train retries a worker group it cannot place without end by default; a trial whose
    # workers do not fit (a node gone, resources held elsewhere) fails after one bounded wait,
    # which Ray Train reads from this variable in the trial process (it hands it to its
    # controller). A worker lost mid-trial still restarts the group up to `max_failures` times.
    os.environ[START_TIMEOUT_VAR] = f"{cfg['placement_timeout_s']:g}"
    if hasattr(failure, "controller_failure_limit"):
        failure.controller_failure_limit = 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend=distributed_backend(cfg, resources)),
        scaling_config=ScalingConfig(
            num_workers=cfg["workers"], use_gpu=cfg["use_gpu"], resources_per_worker=resources
        ),
        run_config=RunConfig(
            name="workers",
            # Inside the trial folder: the same trial restarted finds its run and resumes it.
            **_workers_storage(trial_dir),
            failure_config=failure,
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # resuming needs the latest only
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # mypy reads v1's RunConfig; Train v2's runs
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        if type(getattr(exc, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
            raise WorkerPlacementError(placement_message(cfg, resources)) from None
        raise

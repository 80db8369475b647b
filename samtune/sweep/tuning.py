"""What both of a sweep's Tuners share: the trial function with its resources, whether a trial
process serves the next trial, and the run config (callbacks, failures, checkpoints) that makes
them resumable."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samtune.sweep.plan import Plan
from samtune.sweep.recording import SweepCallback
from samtune.sweep.recovery import (
    EXPERIMENT_STATE_PERIOD_S,
    CheckpointPruner,
    StateBackup,
)
from samtune.sweep.study import Sweep
from samtune.trial.ray_trial import run_trial

if TYPE_CHECKING:
    from ray.tune import RunConfig


#: Seconds between Tune's uploads of its experiment state to object storage.
REMOTE_SYNC_PERIOD_S = 10


def reuse_trial_processes(sweep: Sweep) -> bool:
    """Whether a trial process serves the next trial, of any cell.

    With one worker, yes: no new process and no torch/Ray imports per trial (seconds each on 2
    cores). With several, no: the trial's thread is still inside `TorchTrainer.fit()`, tearing
    down its worker group, when Tune asks the process to take the next trial; Tune gives that
    thread 2 s, then fails the next trial ("Could not re-use actor"). A fresh process per trial
    costs little beside starting a worker group, and the old process's end frees its workers.
    """
    return sweep.workers == 1


def trainable(resources: dict[str, float]) -> Callable[..., Any]:
    """`run_trial` holding ``resources`` per trial."""
    from ray import tune

    # See CheckpointPruner. Read by the Tuner's controller, so set before it exists.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_STATE_PERIOD_S))
    return tune.with_resources(run_trial, resources)


def run_config(plan: Plan, folder: str, callback: SweepCallback) -> RunConfig:
    """The Tuner's run config for its experiment ``folder`` of the sweep, its events going to
    ``callback``."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback

    callbacks = [callback, CSVLoggerCallback(), CheckpointPruner()]
    if plan.bucket is None:
        # Tune writes its state file in place on a local disk; an object is replaced whole.
        callbacks.append(StateBackup(str(Path(plan.sweep_dir) / folder)))
    return tune.RunConfig(
        name=folder,
        storage_path=plan.tune_storage,
        verbose=0,
        # Each trial's progress.csv is what a resumed driver rebuilds finished trials from.
        callbacks=callbacks,
        # In object storage, what a driver killed outright can lose of Tune's state is what it
        # wrote since the last upload: so upload often (an upload is a few small objects).
        sync_config=tune.SyncConfig(sync_period=REMOTE_SYNC_PERIOD_S),
        # A crashed trial process restarts from its last checkpoint as often as the sweep allows.
        failure_config=tune.FailureConfig(max_failures=int(plan.sweep.fixed.get("max_failures", 2))),
        # All kept by Tune; CheckpointPruner removes those no resume can need.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
    )

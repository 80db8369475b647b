"""The environment samtune runs Ray with (no Ray import here: it is read before Ray is).

Ray Train's generation is chosen where a trial runs; Tune's output settings where the sweep's
driver runs. Set in this process before Ray is imported, and handed to a Ray job's workers,
which on a cluster started by `ray start` do not inherit this process's environment.
"""

from __future__ import annotations

import os

RAY_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # Tune's own progress tables and the driver's copy of every worker log would bury the view.
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Ray starts its worker processes at nice 15, below everything else on the machine. Beside
    # any other busy process (a second sweep, a build) the trials, their Ray Train workers and the
    # controllers that tear worker groups down then get a few percent of a core: a 2-worker trial
    # finished, the next one waited out its placement timeout while the last one's worker group
    # was still being torn down. At 0 they share the machine fairly. Read by the raylet a sweep
    # starts itself; a `ray start` cluster takes it from the environment `ray start` runs in.
    "RAY_worker_niceness": "0",
}


def apply_ray_env() -> dict:
    """Set each variable this process has not set itself; returns a `runtime_env` that hands
    the values in force to a Ray job's workers."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    return {"env_vars": {key: os.environ[key] for key in RAY_ENV}}

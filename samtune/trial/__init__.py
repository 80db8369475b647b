"""One trial: a config in, per-epoch metrics out; in this process (`fit`), as a Ray Train worker
(`train_loop_per_worker`) or as a Ray Tune trial (`run_trial`).

Each name is read from the module that defines it when first used (`samtune._lazy`).
"""
from samtune._lazy import lazy_exports

_EXPORTS = {
    "fit": "entry",
    "train_loop_per_worker": "entry",
    "run_trial": "ray_trial",
    "resolve_config": "config",
    "perturbation_plan": "config",
    "Perturbation": "config",
    "TrialConfigError": "config",
    "worker_resources": "placement",
    "distributed_backend": "placement",
    "WorkerPlacementError": "placement",
    "pretrain": "pretrain",
    "pretrained_state": "pretrain",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

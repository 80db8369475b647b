"""A sweep: the study a space file defines, its search (Optuna TPE + ASHA per cell, under Ray Tune),
its records in MLflow, and recovery from crashes.

Each name is read from the module that defines it when first used (`samtune._lazy`).
"""
from samtune._lazy import lazy_exports

_EXPORTS = {
    "Sweep": "study",
    "Cell": "study",
    "load_space": "space_file",
    "check_space": "check",
    "validate_trial_config": "validate",
    "apply_overrides": "study",
    "parse_assignments": "study",
    "prepare": "driver",
    "run_sweep": "driver",
    "summarize": "results",
    "load_study": "results",
    "SweepError": "errors",
    "SweepInterrupted": "errors",
    "Tracker": "tracking",
    "SpaceError": "samtune.contract.values",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""A sweep: the study a space file defines, its search (Optuna TPE + ASHA per cell, all cells under
one Ray Tune Tuner), its records in MLflow, and recovery from crashes.

What is run: `study` (the `Sweep`), `space_file` (reading a space file), `validate` and `check`
(every trial config the space can produce), `preflight` and `cluster` (the dataset, storage and
cluster it needs). Running it: `driver` (`prepare`, `run_sweep`), `plan`, `search`, `ray_env`.
Recording it and surviving a crash: `recording`, `tracking`, `recovery`, `interrupts`,
`driver_lock`. What came of it: `results`, `view`, `errors`.

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

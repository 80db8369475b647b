"""A sweep: the study a space file defines, its search (Optuna TPE + ASHA per cell, all cells under
one Ray Tune Tuner), its records in MLflow, and recovery from crashes.

What is run: `study` (the `Sweep`), `space_file` (reading a space file), `validate` and `check`
(every trial config the space can produce), `preflight` and `cluster` (the dataset, storage and
cluster it needs). Running it: `driver` (`prepare`, `run_sweep`), `plan`, `search`, `ray_env`.
Recording it and surviving a crash: `recording`, `tracking`, `recovery`, `interrupts`,
`driver_lock`. What came of it: `results`, `view`, `errors`.
"""
from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

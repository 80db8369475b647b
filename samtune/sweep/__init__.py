"""A sweep: the study a space file defines, its search (Optuna TPE + ASHA per cell, all cells under
one Ray Tune Tuner), its records in MLflow, and recovery from crashes.

What is run: `study` (the `Sweep`), `space_file` (reading a space file), `validate` and `check`
(every trial config the space can produce), `preflight` and `cluster` (the dataset, storage and
cluster it needs), `estimate` (its size, and its duration measured here). Running it: `driver` (`prepare`, `run_sweep`), `plan`, `search` (with
`optuna_storage`: the Optuna storage each cell's study lives in), `ray_env`.
Recording it and surviving a crash: `recording`, `tracking` (with `run_names`, what its runs
are called), `pick_models` (the picks' weights as MLflow models), `spectra` (one cell's picks'
Hessian eigenvalue density, for the claims view), `recovery`, `interrupts`,
`driver_lock`; where its files are and this driver's hold on them: `storage` (in a bucket:
`object_store`, `lease`, `bucket_journal`); its studies in optuna-dashboard: `studies_dashboard`.
Confirming the picks: `baselines`, `confirm` (with `ablations`: the settings moved one at a time
around each pick; `flatness`: which of its runs measure the Hessian's top eigenvalues). What came
of it: `results`, `view` (with `progress`: where each stage is), `errors`.

Offers: `Sweep`, `Cell`, `apply_overrides`, `parse_assignments` (study), `load_space`
(space_file), `check_space` (check), `validate_trial_config` (validate), `prepare` and
`run_sweep` (driver), `summarize` and `load_study` (results), `SweepError` and
`SweepInterrupted` (errors), `Tracker` (tracking) and `SpaceError`. Kept: what makes a `Sweep`
valid (sweep_checks), reading ``key=value`` items (assignments), and the parts of the MLflow
writer: runs by key (run_keys), one record written to its run (run_writes), the queue that keeps
training from waiting on MLflow (write_queue), the spool of records not yet written (spool) and
where the store is (store); the rest of each module named above is the sweep's own.
"""

from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

"""Running a sweep: a Ray Tune study (Optuna TPE + ASHA) of `train.run_trial` per scenario cell.

Every cell of the `Sweep` (e.g. label noise 0.0, 0.2, ... 0.8) has its own `OptunaSearch` (TPE,
seeded per cell) over the space file's `space(trial)`, and its own `ASHAScheduler` stopping
hopeless trials on the per-epoch metric. SGD and SAM trials share a cell's study, so each cell has
its own baseline. All cells run under one `Tuner` (`CellSearch` deals trials out cell after cell,
`CellScheduler` keeps each cell's ASHA apart), so trial processes serve every cell. The driver
writes every trial to MLflow (`samtune.tracking`) and shows a live view; Ray's own tables are
turned off.

On disk, under ``<storage_path>/<sweep name>/``: ``sweep.json`` (what was run and the sweep id its
MLflow runs are keyed by, for ``--resume``), the Tune experiment folder ``trials/`` (trial
checkpoints, every cell's searcher state) and, if the tracking server failed, the spool of
records it did not take. ``--resume`` restores the Tuner, so finished trials are not run again and
each cell's Optuna searcher continues from its saved state.
"""
from __future__ import annotations


class SweepError(ValueError):
    """A sweep that cannot start: bad storage, unreachable services, nothing to resume."""


class SweepInterrupted(RuntimeError):
    """The sweep was interrupted; ``samtune sweep FILE --resume`` finishes it."""

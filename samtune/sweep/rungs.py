"""Early stopping that does not depend on timing: ASHA's rungs, judged batch by batch.

Asynchronous ASHA stops a trial at a rung when its metric is outside the best ``1 / reduction
factor`` of whatever the rung holds when it arrives, so the same trial may run on or stop
depending on which trials happened to get there first. `BatchedASHA` keeps ASHA's rungs
(``grace_period * reduction_factor**i`` epochs, below the budget) and its cutoff, but judges
trial k of a cell only against the trials of the cell's earlier search batches (`CellSearch`
with a ``batch``). Those have all ended before trial k's batch was suggested, so its verdict at
every rung is a function of results alone, and no trial ever waits for another. The first batch
has no one to be judged against and runs its budget, as a cell's baselines always do.

>>> rungs(max_t=16, grace_period=4, reduction_factor=2)
[4, 8]
>>> stops(0.31, [0.2, 0.25, 0.3, 0.4], mode="min", reduction_factor=2)
True
>>> stops(0.24, [0.2, 0.25, 0.3, 0.4], mode="min", reduction_factor=2)
False
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler

from samtune.sweep.results import finite

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


def rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The epochs ASHA judges trials at: ``grace_period * reduction_factor**i`` below ``max_t``."""
    out: list[int] = []
    epoch = float(grace_period)
    while epoch < max_t:
        out.append(int(math.ceil(epoch - 1e-9)))
        epoch *= reduction_factor
    return sorted(set(out))


def stops(value: float, peers: Sequence[float], mode: str, reduction_factor: float) -> bool:
    """Whether a trial with ``value`` at a rung falls outside the best ``1 / reduction_factor``
    of ``peers`` there (ASHA's cutoff: that quantile of the peers, the trial itself left out).
    No peers, no verdict: it runs on."""
    known = [float(p) for p in peers if finite(p)]
    if not known:
        return False
    if not finite(value):
        return True
    if mode == "min":
        return value > float(np.percentile(known, 100.0 / reduction_factor))
    return value < float(np.percentile(known, 100.0 * (1 - 1.0 / reduction_factor)))


class BatchedASHA(FIFOScheduler):
    """One deterministic ASHA per cell behind a sweep's one Tuner (see the module's text).

    The rungs' records live in the `CellSearch` (``search.rungs``), which Tune saves with the
    experiment, so a resumed sweep judges its remaining trials against the same records.
    A cell's baseline trials are recorded but never stopped.
    """

    def __init__(self, search: Any, max_t: int, grace_period: int, reduction_factor: float, metric: str, mode: str):
        super().__init__()
        self.search = search
        self.max_t = max_t
        self.milestones = rungs(max_t, grace_period, reduction_factor)
        self.reduction_factor = reduction_factor
        self._metric, self._mode = metric, mode

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        epoch = result.get("epoch")
        placed = self.search.numbers.get(trial.trial_id)
        if placed is None or not isinstance(epoch, int) or epoch not in self.milestones:
            return self.CONTINUE
        cell, number = placed
        value = result.get(self._metric)
        value = float(value) if finite(value) else math.nan
        records = self.search.rungs.setdefault(cell, {}).setdefault(epoch, {})
        records[number] = value
        if trial.config.get("baseline") or result.get("diverged"):
            return self.CONTINUE  # a baseline runs its budget; a diverged trial ends by itself
        batch = self.search.batch
        peers = [v for k, v in records.items() if k // batch < number // batch]
        return self.STOP if stops(value, peers, self._mode, self.reduction_factor) else self.CONTINUE

    def debug_string(self) -> str:
        return f"BatchedASHA: rungs at epochs {self.milestones}, judged against earlier batches"

"""samtune: when, and how much, does Sharpness-Aware Minimization help?

The public API is small and re-exported here, each name read from its module when first used, so
that `import samtune` stays cheap for a user who only wants the optimizer.

>>> import samtune
>>> samtune.SAM.__module__
'samtune.optim.sam'
"""
from __future__ import annotations

from samtune._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "SAM": "optim.sam",
    "sam_step": "optim.step",
    "train_loop_per_worker": "trial.entry",
    "fit": "trial.entry",
    "Sweep": "sweep.study",
    "load_space": "sweep.space_file",
    "measure_sharpness": "sharpness.measures",
    "load_dataset": "data.load",
    "build_model": "models.zoo",
    "build_scenario": "data.scenarios",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

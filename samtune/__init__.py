"""samtune: when, and how much, does Sharpness-Aware Minimization help?

The public API is small and re-exported here. Heavy modules (Ray, MLflow) are imported lazily so
that `import samtune` stays cheap for a user who only wants the optimizer.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SAM": "samtune.sam",
    "sam_step": "samtune.sam",
    "train_loop_per_worker": "samtune.train",
    "fit": "samtune.train",
    "Sweep": "samtune.space",
    "load_space": "samtune.space",
    "measure_sharpness": "samtune.sharpness",
    "load_dataset": "samtune.data",
    "build_model": "samtune.models",
    "build_scenario": "samtune.scenarios",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'samtune' has no attribute {name!r}")

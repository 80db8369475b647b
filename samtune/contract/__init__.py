"""The trial contract, free of torch: every trial key, every metric and every MLflow tag name, once.

Each name is read from the module that defines it when first used (`samtune._lazy`).
"""
from samtune._lazy import lazy_exports

_EXPORTS = {
    "TRIAL_KEYS": "keys",
    "DEFAULTS": "keys",
    "STUDY_KEYS": "keys",
    "METRICS": "metrics",
    "OPTIMISABLE": "metrics",
    "Setting": "values",
    "SpaceError": "values",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

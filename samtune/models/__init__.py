"""The model zoo, classification heads and frozen BatchNorm, and pretrained weights from local files.

Each name is read from the module that defines it when first used (`samtune._lazy`).
"""
from samtune._lazy import lazy_exports

_EXPORTS = {
    "build_model": "zoo",
    "MODELS": "zoo",
    "param_groups": "heads",
    "freeze_batchnorm_stats": "heads",
    "find_head": "heads",
    "replace_head": "heads",
    "head_parameter_names": "heads",
    "FrozenStatsBatchNorm2d": "heads",
    "FrozenStatsBatchNorm1d": "heads",
    "load_backbone": "weights",
    "read_state_dict": "weights",
    "resolve_source": "weights",
    "load_source": "weights",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

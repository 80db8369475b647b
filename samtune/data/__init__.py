"""Datasets read from local files and held in memory as uint8 tensors, with batched transforms,
label noise and the scenarios a trial trains on.

`load_dataset` (in `samtune.data.load`, whose docstring lists the datasets and where each is
found) returns a `Dataset`; decoded sources are cached on disk (`samtune.data.cache`).
Each name is read from the module that defines it when first used (`samtune._lazy`).
"""
from samtune._lazy import lazy_exports

_EXPORTS = {
    "load_dataset": "load",
    "Dataset": "dataset",
    "DATASETS": "dataset",
    "parse_dataset_name": "load",
    "select_classes": "load",
    "to_float": "transforms",
    "augment_batch": "transforms",
    "channel_stats": "transforms",
    "DataNotFoundError": "dataset",
    "DataUnreadableError": "dataset",
    "build_scenario": "scenarios",
    "Scenario": "scenarios",
    "split_sizes": "scenarios",
    "apply_label_noise": "noise",
    "asymmetric_class_map": "noise",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

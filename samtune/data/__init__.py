"""Datasets read from local files and held in memory as uint8 tensors, with batched transforms,
label noise and the scenarios a trial trains on.

`load_dataset` (in `samtune.data.load`, whose docstring lists the datasets and where each is
found) returns a `Dataset`; decoded sources are cached on disk (`samtune.data.cache`).
Each name is read from the module that defines it when first used (`samtune._lazy`).

Offers: `load_dataset`, `parse_dataset_name`, `select_classes`, `Dataset`, `DATASETS`,
`DataNotFoundError`, `DataUnreadableError`; `to_float`, `augment_batch`, `channel_stats`;
`build_scenario`, `Scenario`, `split_sizes`; `apply_label_noise`, `asymmetric_class_map`. Kept:
how each source is read (cifar, images) and cached (cache).
"""

from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

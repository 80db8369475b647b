"""The model zoo, classification heads and frozen BatchNorm, and pretrained weights from local files.

Offers: `build_model` and `MODELS` (zoo); `param_groups`, `freeze_batchnorm_stats`, `find_head`,
`replace_head`, `head_parameter_names`, `FrozenStatsBatchNorm2d`, `FrozenStatsBatchNorm1d`
(heads); `load_backbone`, `read_state_dict`, `resolve_source`, `load_source` (weights). Kept: the
architectures' building blocks, each in the module that uses it.
"""

from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

"""SAM and its variants as torch.optim optimizers: the SAM optimizer, the step driver with m-sharpness
under data parallelism, and the cheaper variants.

Each name is read from the module that defines it when first used (`samtune._lazy`).
"""
from samtune._lazy import lazy_exports

_EXPORTS = {
    "SAM": "sam",
    "sam_step": "step",
    "SAMVariant": "variants",
    "make_variant": "variants",
    "variant_from_config": "variants",
    "FullSAM": "variants",
    "EveryKSAM": "variants",
    "RandomizedSAM": "variants",
    "LookSAM": "variants",
    "AESAM": "variants",
    "VARIANTS": "variants",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

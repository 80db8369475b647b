"""SAM and its variants as torch.optim optimizers: the SAM optimizer, the step driver with m-sharpness
under data parallelism, and the cheaper variants.
"""
from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

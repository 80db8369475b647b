"""The model zoo, classification heads and frozen BatchNorm, and pretrained weights from local files.
"""
from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

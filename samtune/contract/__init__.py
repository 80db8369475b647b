"""The trial contract, free of torch: every trial key, every metric and every MLflow tag name, once.
"""
from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

"""Sharpness measures of a trained model: worst-case (m-, adaptive) and average-case sharpness,
Hessian top eigenvalue and trace, PAC-Bayes sigma.

Each name is read from the module that defines it when first used (`samtune._lazy`).
"""
from samtune._lazy import lazy_exports

_EXPORTS = {
    "measure_sharpness": "measures",
    "check_measures": "measures",
    "MEASURES": "measures",
    "SHARED_KEYS": "measures",
    "FlatLoss": "hvp",
    "m_sharpness": "worst_case",
    "adaptive_sharpness": "worst_case",
    "avg_sharpness": "worst_case",
    "hessian_top_eig": "curvature",
    "hessian_trace": "curvature",
    "pac_bayes_sigma": "curvature",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.sharpness.curvature import hessian_top_eig as hessian_top_eig
from samtune.sharpness.curvature import hessian_trace as hessian_trace
from samtune.sharpness.curvature import pac_bayes_sigma as pac_bayes_sigma
from samtune.sharpness.hvp import FlatLoss as FlatLoss
from samtune.sharpness.measures import MEASURES as MEASURES
from samtune.sharpness.measures import SHARED_KEYS as SHARED_KEYS
from samtune.sharpness.measures import check_measures as check_measures
from samtune.sharpness.measures import measure_sharpness as measure_sharpness
from samtune.sharpness.worst_case import adaptive_sharpness as adaptive_sharpness
from samtune.sharpness.worst_case import avg_sharpness as avg_sharpness
from samtune.sharpness.worst_case import m_sharpness as m_sharpness

__all__ = ['FlatLoss', 'MEASURES', 'SHARED_KEYS', 'adaptive_sharpness', 'avg_sharpness', 'check_measures', 'hessian_top_eig', 'hessian_trace', 'm_sharpness', 'measure_sharpness', 'pac_bayes_sigma']

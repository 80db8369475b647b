# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.models.heads import FrozenStatsBatchNorm1d as FrozenStatsBatchNorm1d
from samtune.models.heads import FrozenStatsBatchNorm2d as FrozenStatsBatchNorm2d
from samtune.models.heads import find_head as find_head
from samtune.models.heads import freeze_batchnorm_stats as freeze_batchnorm_stats
from samtune.models.heads import head_parameter_names as head_parameter_names
from samtune.models.heads import param_groups as param_groups
from samtune.models.heads import replace_head as replace_head
from samtune.models.weights import load_backbone as load_backbone
from samtune.models.weights import load_source as load_source
from samtune.models.weights import read_state_dict as read_state_dict
from samtune.models.weights import resolve_source as resolve_source
from samtune.models.zoo import MODELS as MODELS
from samtune.models.zoo import build_model as build_model

__all__ = ['FrozenStatsBatchNorm1d', 'FrozenStatsBatchNorm2d', 'MODELS', 'build_model', 'find_head', 'freeze_batchnorm_stats', 'head_parameter_names', 'load_backbone', 'load_source', 'param_groups', 'read_state_dict', 'replace_head', 'resolve_source']

# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.contract.keys import DEFAULTS as DEFAULTS
from samtune.contract.keys import STUDY_KEYS as STUDY_KEYS
from samtune.contract.keys import TRIAL_KEYS as TRIAL_KEYS
from samtune.contract.metrics import METRICS as METRICS
from samtune.contract.metrics import OPTIMISABLE as OPTIMISABLE
from samtune.contract.values import Setting as Setting
from samtune.contract.values import SpaceError as SpaceError

__all__ = ['DEFAULTS', 'METRICS', 'OPTIMISABLE', 'STUDY_KEYS', 'Setting', 'SpaceError', 'TRIAL_KEYS']

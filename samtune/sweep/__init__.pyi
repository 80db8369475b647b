# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.contract.values import SpaceError as SpaceError
from samtune.sweep.check import check_space as check_space
from samtune.sweep.driver import prepare as prepare
from samtune.sweep.driver import run_sweep as run_sweep
from samtune.sweep.errors import SweepError as SweepError
from samtune.sweep.errors import SweepInterrupted as SweepInterrupted
from samtune.sweep.results import load_study as load_study
from samtune.sweep.results import summarize as summarize
from samtune.sweep.space_file import load_space as load_space
from samtune.sweep.study import Cell as Cell
from samtune.sweep.study import Sweep as Sweep
from samtune.sweep.study import apply_overrides as apply_overrides
from samtune.sweep.study import parse_assignments as parse_assignments
from samtune.sweep.tracking import Tracker as Tracker
from samtune.sweep.validate import validate_trial_config as validate_trial_config

__all__ = ['Cell', 'SpaceError', 'Sweep', 'SweepError', 'SweepInterrupted', 'Tracker', 'apply_overrides', 'check_space', 'load_space', 'load_study', 'parse_assignments', 'prepare', 'run_sweep', 'summarize', 'validate_trial_config']

# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.data.load import load_dataset as load_dataset
from samtune.data.scenarios import build_scenario as build_scenario
from samtune.models.zoo import build_model as build_model
from samtune.optim.sam import SAM as SAM
from samtune.optim.step import sam_step as sam_step
from samtune.sharpness.measures import measure_sharpness as measure_sharpness
from samtune.sweep.space_file import load_space as load_space
from samtune.sweep.study import Sweep as Sweep
from samtune.trial.entry import fit as fit
from samtune.trial.entry import train_loop_per_worker as train_loop_per_worker

__version__: str

__all__ = ['SAM', 'Sweep', 'build_model', 'build_scenario', 'fit', 'load_dataset', 'load_space', 'measure_sharpness', 'sam_step', 'train_loop_per_worker']

# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.trial.config import Perturbation as Perturbation
from samtune.trial.config import TrialConfigError as TrialConfigError
from samtune.trial.config import perturbation_plan as perturbation_plan
from samtune.trial.config import resolve_config as resolve_config
from samtune.trial.entry import fit as fit
from samtune.trial.entry import train_loop_per_worker as train_loop_per_worker
from samtune.trial.placement import WorkerPlacementError as WorkerPlacementError
from samtune.trial.placement import distributed_backend as distributed_backend
from samtune.trial.placement import worker_resources as worker_resources
from samtune.trial.pretrain import pretrain as pretrain
from samtune.trial.pretrain import pretrained_state as pretrained_state
from samtune.trial.ray_trial import run_trial as run_trial

__all__ = ['Perturbation', 'TrialConfigError', 'WorkerPlacementError', 'distributed_backend', 'fit', 'perturbation_plan', 'pretrain', 'pretrained_state', 'resolve_config', 'run_trial', 'train_loop_per_worker', 'worker_resources']

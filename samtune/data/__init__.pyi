# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.data.dataset import DATASETS as DATASETS
from samtune.data.dataset import DataNotFoundError as DataNotFoundError
from samtune.data.dataset import DataUnreadableError as DataUnreadableError
from samtune.data.dataset import Dataset as Dataset
from samtune.data.load import load_dataset as load_dataset
from samtune.data.load import parse_dataset_name as parse_dataset_name
from samtune.data.load import select_classes as select_classes
from samtune.data.noise import apply_label_noise as apply_label_noise
from samtune.data.noise import asymmetric_class_map as asymmetric_class_map
from samtune.data.scenarios import Scenario as Scenario
from samtune.data.scenarios import build_scenario as build_scenario
from samtune.data.scenarios import split_sizes as split_sizes
from samtune.data.transforms import augment_batch as augment_batch
from samtune.data.transforms import channel_stats as channel_stats
from samtune.data.transforms import to_float as to_float

__all__ = ['DATASETS', 'DataNotFoundError', 'DataUnreadableError', 'Dataset', 'Scenario', 'apply_label_noise', 'asymmetric_class_map', 'augment_batch', 'build_scenario', 'channel_stats', 'load_dataset', 'parse_dataset_name', 'select_classes', 'split_sizes', 'to_float']

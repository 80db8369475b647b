# Generated from samtune._lazy.FACES by samtune._lazy.stub: do not edit.

from samtune.report.load import load_runs as load_runs
from samtune.report.page import build as build
from samtune.report.page import build_report as build_report
from samtune.report.runs import NoFinishedTrialsError as NoFinishedTrialsError
from samtune.report.runs import ReportError as ReportError
from samtune.report.runs import Runs as Runs
from samtune.report.runs import SHARPNESS_SHARED_KEYS as SHARPNESS_SHARED_KEYS
from samtune.report.runs import TrialRecord as TrialRecord
from samtune.report.table import best_per_optimizer as best_per_optimizer
from samtune.report.table import cell_order as cell_order
from samtune.report.table import choice_metric as choice_metric
from samtune.report.table import effective_m as effective_m
from samtune.report.table import optimizer_colors as optimizer_colors
from samtune.report.table import searched_hyperparameters as searched_hyperparameters
from samtune.report.table import tabulate as tabulate
from samtune.report.views import View as View
from samtune.report.views import ViewSpec as ViewSpec

__all__ = ['NoFinishedTrialsError', 'ReportError', 'Runs', 'SHARPNESS_SHARED_KEYS', 'TrialRecord', 'View', 'ViewSpec', 'best_per_optimizer', 'build', 'build_report', 'cell_order', 'choice_metric', 'effective_m', 'load_runs', 'optimizer_colors', 'searched_hyperparameters', 'tabulate']

"""The report: a sweep's runs read from MLflow, a tidy table of trials, the views in dashboards/ drawn
on one page.

Each name is read from the module that defines it when first used (`samtune._lazy`).
"""
from samtune._lazy import lazy_exports

_EXPORTS = {
    "build": "page",
    "build_report": "page",
    "load_runs": "load",
    "Runs": "runs",
    "TrialRecord": "runs",
    "View": "views",
    "ViewSpec": "views",
    "ReportError": "runs",
    "NoFinishedTrialsError": "runs",
    "SHARPNESS_SHARED_KEYS": "runs",
    "cell_order": "table",
    "choice_metric": "table",
    "best_per_optimizer": "table",
    "effective_m": "table",
    "optimizer_colors": "table",
    "searched_hyperparameters": "table",
    "tabulate": "table",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

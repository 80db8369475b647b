"""The sweep report: runs -> tidy table -> views -> page.

`load` reads a sweep's trial runs from MLflow, `table` turns them into the tidy `Runs` table
(`runs`) and holds the choices views share, `views` finds and runs the views in `dashboards/`,
and `page` draws them on one offline HTML page, logged back to the sweep's MLflow run (`build`).

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

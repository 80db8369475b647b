"""The sweep report: runs -> tidy table -> views -> page.

`load` reads a sweep's trial runs from MLflow, `table` turns them into the tidy `Runs` table
(`runs`) and holds the choices views share, `views` finds and runs the views in `dashboards/`,
and `page` draws them on one offline HTML page, logged back to the sweep's MLflow run (`build`).

Offers: `build` and `build_report` (page), `load_runs` (load), `Runs`, `TrialRecord`,
`ReportError`, `NoFinishedTrialsError`, `SHARPNESS_SHARED_KEYS` (runs), `View` and `ViewSpec`
(views), `cell_order`, `choice_metric`, `best_per_optimizer`, `effective_m`, `optimizer_colors`,
`searched_hyperparameters`, `tabulate` (table). Kept: the confirmation runs and verdicts read back
(answers), the SAM paper's claims tested on them (claims) and the MLflow UI page `samtune ui` opens (landing).
"""

from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

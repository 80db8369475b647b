"""The sweep report: runs -> tidy table -> views -> page.

`load` reads a sweep's trial runs from MLflow, `table` turns them into the tidy `Runs` table
(`runs`) and holds the choices views share, `views` finds and runs the views in `dashboards/`,
and `page` draws them on one offline HTML page, logged back to the sweep's MLflow run (`build`).
"""
from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

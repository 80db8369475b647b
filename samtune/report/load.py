"""Reading a sweep from MLflow: its cell and trial runs, their metrics, tabulated into `Runs`."""
from __future__ import annotations

from samtune.contract.tags import ROLE_TAG
from samtune.report.runs import ReportError, Runs, TrialRecord
from samtune.report.table import tabulate

# -- reading MLflow ------------------------------------------------------------------------------


def load_runs(experiment: str, tracking_uri: str | None = None, *, all_sweeps: bool = False) -> Runs:
    """Read the trial runs of `experiment`'s newest sweep from MLflow into a `Runs` table.

    A sweep run again under the same name (a new ``--storage-path``) gets a sweep run of its
    own; only the trials nested under the newest one (through its cell runs) are read, unless
    `all_sweeps=True` reads every trial of the experiment. An experiment with no sweep run
    (trials logged some other way) is read whole.
    `tracking_uri=None` follows MLflow's own resolution (MLFLOW_TRACKING_URI, else its local
    default). Raises `ReportError` if there is no experiment of that name; an experiment with
    no trial runs gives an empty table.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no MLflow experiment named {experiment!r} at {uri}")

    def search(role: str) -> list:
        found, token = [], None
        while True:
            page = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{ROLE_TAG}` = '{role}'",
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                page_token=token,
            )
            found.extend(page)
            token = page.token
            if not token:
                return found

    sweeps = sorted(search("sweep"), key=lambda r: r.info.start_time or 0)
    trials = search("trial")
    if sweeps and not all_sweeps:
        parents = {sweeps[-1].info.run_id} | {
            cell.info.run_id for cell in search("cell")
            if cell.data.tags.get("mlflow.parentRunId") == sweeps[-1].info.run_id}
        trials = [t for t in trials if t.data.tags.get("mlflow.parentRunId") in parents]
    records = []
    for run in trials:
        history = {}
        for key in run.data.metrics:
            points = client.get_metric_history(run.info.run_id, key)
            # Logging order decides between two values for one epoch (a resumed trial).
            points = sorted(points, key=lambda p: (p.step, p.timestamp))
            history[key] = [(int(p.step), float(p.value)) for p in points]
        records.append(TrialRecord(
            run_id=run.info.run_id,
            params=dict(run.data.params),
            tags=dict(run.data.tags),
            history=history,
            run_status=run.info.status,
            start_time=run.info.start_time,
        ))
    return tabulate(
        experiment,
        records,
        tracking_uri=uri,
        sweep_run_id=sweeps[-1].info.run_id if sweeps else None,
    )

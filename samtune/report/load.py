"""Reading a sweep from MLflow into the `Runs` table.

Reads the layout that `samtune.sweep.tracking` writes (described there in full): trial runs
tagged `samtune.role=trial` (with `samtune.cell`, `samtune.status`, `samtune.trial_key`), nested
under cell runs (`samtune.role=cell`) under the sweep's run (`samtune.role=sweep`); params are
the flat trial config, metrics are logged per epoch with `step=epoch`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Collection
from typing import Any

from samtune.contract.messages import first_line, masked
from samtune.contract.tags import ALIASES_TAG, CELL_TAG, PICKS_TAG, ROLE_TAG, SPECTRAL_DENSITY_TAG
from samtune.report.answers import HISTORIES, confirmation_frame
from samtune.report.runs import ReportError, Runs, TrialRecord, design_of, parse_picks
from samtune.report.table import tabulate

log = logging.getLogger(__name__)


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

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no MLflow experiment named {experiment!r} at {masked(uri)}")
    sweeps = sorted(_search_runs(client, exp.experiment_id, "sweep"), key=lambda r: r.info.start_time or 0)
    trials = _search_runs(client, exp.experiment_id, "trial")
    reruns = _search_runs(client, exp.experiment_id, "confirm") + _search_runs(client, exp.experiment_id, "ablation")
    if sweeps and not all_sweeps:
        trials = _nested_under(client, exp.experiment_id, sweeps[-1].info.run_id, trials)
        reruns = _nested_under(client, exp.experiment_id, sweeps[-1].info.run_id, reruns)
    runs = tabulate(
        experiment,
        [_trial_record(client, run) for run in trials],
        tracking_uri=uri,
        sweep_run_id=sweeps[-1].info.run_id if sweeps else None,
    )
    runs.design = design_of(sweeps[-1].data.params) if sweeps else None
    # A confirmation run's table row needs the history of few metrics (`HISTORIES`) and the
    # latest value of the rest: one query per metric and run is most of a report's reading time.
    runs.confirmations = confirmation_frame([_trial_record(client, run, HISTORIES) for run in reruns])
    cells = _search_runs(client, exp.experiment_id, "cell")
    if sweeps and not all_sweeps:
        # Cell labels repeat from sweep to sweep: only the newest sweep's cells speak for it.
        cells = [c for c in cells if c.data.tags.get("mlflow.parentRunId") == sweeps[-1].info.run_id]
    runs.aliases = {
        c.data.tags.get(CELL_TAG, ""): c.data.tags[ALIASES_TAG] for c in cells if ALIASES_TAG in c.data.tags
    }
    runs.picks = {
        c.data.tags.get(CELL_TAG, ""): parse_picks(c.data.tags[PICKS_TAG]) for c in cells if PICKS_TAG in c.data.tags
    }
    runs.spectra = {
        c.data.tags.get(CELL_TAG, ""): found
        for c in cells
        if SPECTRAL_DENSITY_TAG in c.data.tags
        and (found := _spectral_density(client, c.info.run_id, c.data.tags[SPECTRAL_DENSITY_TAG]))
    }
    return runs


def _spectral_density(client: Any, run_id: str, path: str) -> dict[str, Any]:
    """The JSON a cell run's spectral density tag names (empty, with a log line, where it
    cannot be read: the report draws the rest without it)."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            local = client.download_artifacts(run_id, path, folder)
            with open(local) as f:
                found = json.load(f)
    except Exception as exc:  # noqa: BLE001  a missing or unreadable artifact: drawn without it
        log.warning("spectral density of run %s not read (%s)", run_id, first_line(exc))
        return {}
    return found if isinstance(found, dict) and "grid" in found and "density" in found else {}


def _search_runs(client: Any, experiment_id: str, role: str) -> list:
    """Every active run of the experiment tagged with `role`, page after page."""
    from mlflow.entities import ViewType

    found, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{role}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def _nested_under(client: Any, experiment_id: str, sweep_run_id: str, trials: list) -> list:
    """The trials whose parent is the sweep run or one of its cell runs."""
    parents = {sweep_run_id} | {
        cell.info.run_id
        for cell in _search_runs(client, experiment_id, "cell")
        if cell.data.tags.get("mlflow.parentRunId") == sweep_run_id
    }
    return [t for t in trials if t.data.tags.get("mlflow.parentRunId") in parents]


def _trial_record(client: Any, run: Any, histories: Collection[str] | None = None) -> TrialRecord:
    """One trial run with the whole history of each of its metrics (of those in ``histories``
    where given, the latest value of the others)."""
    history = {}
    for key in run.data.metrics:
        if histories is not None and key not in histories:
            continue
        points = client.get_metric_history(run.info.run_id, key)
        # Logging order decides between two values for one epoch (a resumed trial).
        points = sorted(points, key=lambda p: (p.step, p.timestamp))
        history[key] = [(int(p.step), float(p.value)) for p in points]
    return TrialRecord(
        run_id=run.info.run_id,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        history=history,
        run_status=run.info.status,
        start_time=run.info.start_time,
        latest={key: float(value) for key, value in run.data.metrics.items()},
    )

"""Where `samtune ui` points its user: the page of the MLflow UI that shows a sweep's training runs.

The MLflow UI (3.x) opens every experiment in its GenAI view (traces, sessions, judges) unless the
page's address asks for the model-training view with ``workflowType=machine_learning``; the
experiment's ``mlflow.experimentKind`` tag, which the sweep sets, is no longer enough on its own.
So the address `samtune ui` prints carries that parameter and names the sweep's experiment: a
click lands on its runs, with the sweep run's verdict in its description.

>>> experiment_page("4")
'#/experiments/4?workflowType=machine_learning'
>>> experiment_page(None)
'#/experiments?workflowType=machine_learning'
"""

from __future__ import annotations

from typing import Any

from samtune.contract.messages import masked
from samtune.contract.tags import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from samtune.report.runs import ReportError

#: The query that opens the MLflow UI on model training rather than on GenAI traces.
TRAINING_VIEW = "workflowType=machine_learning"


def experiment_page(experiment_id: str | None) -> str:
    """The UI's address (its fragment) of an experiment's training runs; None: the experiments list."""
    if experiment_id is None:
        return f"#/experiments?{TRAINING_VIEW}"
    return f"#/experiments/{experiment_id}?{TRAINING_VIEW}"


def sweep_experiment(tracking_uri: str, name: str | None = None) -> tuple[str | None, str | None]:
    """(name, id) of the sweep `name` in the store, or of the newest sweep when `name` is None;
    (None, None) when the store holds no sweep yet.

    A sweep's experiment is one whose kind the sweep set (`EXPERIMENT_KIND_TAG`). Raises
    `ReportError` naming the sweeps there when `name` is not one of them.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    sweeps = [e for e in client.search_experiments() if e.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND]
    if name is None:
        newest = max(sweeps, key=_created, default=None)
        return (newest.name, newest.experiment_id) if newest is not None else (None, None)
    for experiment in sweeps:
        if experiment.name == name:
            return experiment.name, experiment.experiment_id
    known = sorted(e.name for e in sweeps)
    raise ReportError(f"no sweep named {name!r} at {masked(tracking_uri)}; sweeps there: {known or 'none yet'}")


def _created(experiment: Any) -> int:
    return experiment.creation_time or 0

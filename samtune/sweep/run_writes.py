"""Writing one record to its MLflow run: params and metrics in batches MLflow accepts, a trial's
status as a tag and an MLflow run status, and no metric step a run already has.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from samtune.contract.tags import STATUS_TAG
from samtune.sweep.run_keys import RunKeys, RunSpec
from samtune.sweep.spool import Record

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


#: The MLflow run status each final trial status ends its run with (``running`` ends none).
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "diverged": "FINISHED", "failed": "FAILED"}

# MLflow's limits on one `log_batch` call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 500


class RunWriter:
    """Applies records to the runs of `runs` through `client()`."""

    def __init__(self, runs: RunKeys, client: Callable[[], MlflowClient]):
        self.runs = runs
        self.client = client
        # Runs whose last write failed: the server may hold more steps than `last_step` says.
        self.unsure: set[str] = set()

    def apply(self, record: Record) -> None:
        run_id = self.runs.resolve(record.key)
        client = self.client()
        if record.kind == "params":
            self._params(client, run_id, record)
        elif record.kind == "metrics":
            self._metrics(client, run_id, record, self.runs.specs[record.key])
        elif record.kind == "status":
            client.set_tag(run_id, STATUS_TAG, record.payload)
            if record.payload in MLFLOW_STATUS:
                client.set_terminated(run_id, status=MLFLOW_STATUS[record.payload])
        elif record.kind == "tags":
            for name, value in record.payload.items():
                client.set_tag(run_id, name, value)
        elif record.kind == "end":
            client.set_terminated(run_id, status=record.payload)
        elif record.kind == "artifacts":
            client.log_artifacts(run_id, record.payload)
        elif record.kind == "dataset":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            client.log_inputs(
                run_id, [DatasetInput(Dataset(**record.payload), tags=[InputTag("mlflow.data.context", "training")])]
            )
        else:  # pragma: no cover - internal
            raise ValueError(record.kind)

    @staticmethod
    def _params(client: MlflowClient, run_id: str, record: Record) -> None:
        from mlflow.entities import Param

        existing = client.get_run(run_id).data.params
        params = [Param(k, v) for k, v in record.payload.items() if k not in existing]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])

    def _metrics(self, client: MlflowClient, run_id: str, record: Record, spec: RunSpec) -> None:
        from mlflow.entities import Metric

        if record.key in self.unsure:
            # The failed attempt may have reached the server before it timed out: a step the
            # run already has is not logged a second time. The last metric of the record is
            # the one written last (batches go in order), so its presence means all of it.
            last_key = list(record.payload)[-1]
            logged = client.get_metric_history(run_id, last_key)
            spec.last_step = max([spec.last_step] + [m.step for m in logged])
            self.unsure.discard(record.key)
        assert record.step is not None  # a metrics record always has its step
        if record.step <= spec.last_step:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record.step) for k, v in record.payload.items()]
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])
        spec.last_step = record.step

"""The sweep's MLflow runs, named by keys (``samtune.key``): declared by the driver, found again in
the store (a resumed sweep, a restarted trial) or created there on their first write, with the
last epoch each has logged, so no step is logged twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from samtune.contract.tags import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    KEY_TAG,
    NOTE_TAG,
    ROLE_TAG,
    STATUS_TAG,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def quoted(value: str) -> str:
    """`value` as an MLflow search-filter string literal (which has no escapes: pick the quote)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"run key {value!r} holds both kinds of quote; MLflow cannot search for it")


@dataclass
class RunSpec:
    """A declared run: enough to create it (or find it again), and what is known of it so far."""

    key: str
    name: str
    tags: dict[str, str]
    parent: str | None = None
    run_id: str | None = None
    last_step: int = 0


class RunKeys:
    """The runs of one experiment by key; MLflow ids are resolved lazily, through `client()`
    (called each time: the store may be opened, or its client replaced, after this is made)."""

    def __init__(self, experiment: str, client: Callable[[], MlflowClient]):
        self.experiment = experiment
        self.client = client
        self.specs: dict[str, RunSpec] = {}
        self._experiment_id: str | None = None

    def declare(self, key: str, name: str, role: str, parent: str | None, tags: dict[str, Any]) -> None:
        if key not in self.specs:
            all_tags = {KEY_TAG: key, ROLE_TAG: role, "mlflow.runName": name, **tags}
            self.specs[key] = RunSpec(key, name, {k: str(v) for k, v in all_tags.items()}, parent)

    def add(self, run: dict[str, Any]) -> None:
        """Declare a run as a spool line names it (``run``, ``name``, ``tags``, ``parent``)."""
        if run["run"] not in self.specs:
            self.specs[run["run"]] = RunSpec(
                run["run"], run.get("name") or run["run"], dict(run.get("tags") or {}), run.get("parent")
            )

    def run_id(self, key: str) -> str | None:
        spec = self.specs.get(key)
        return spec.run_id if spec else None

    def ancestors(self, key: str) -> list[dict[str, Any]]:
        """The parent chain of run `key` (nearest first), enough to create it from a spool."""
        chain = []
        spec = self.specs.get(key)
        while spec is not None and spec.parent is not None:
            spec = self.specs.get(spec.parent)
            if spec is None:
                break
            chain.append({"run": spec.key, "name": spec.name, "tags": spec.tags, "parent": spec.parent})
        return chain

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            client = self.client()
            found = client.get_experiment_by_name(self.experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            self._experiment_id = (
                found.experiment_id if found is not None else client.create_experiment(self.experiment)
            )
            # The MLflow UI opens an experiment of no kind on its GenAI traces; this one holds
            # training runs, and says so.
            client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return self._experiment_id

    def resolve(self, key: str) -> str:
        """The MLflow run id of `key`: found by its key (reopened if it had ended), else created."""
        spec = self.specs[key]
        if spec.run_id is not None:
            return spec.run_id
        experiment = self.experiment_id()
        client = self.client()
        found = client.search_runs([experiment], filter_string=f"tags.`{KEY_TAG}` = {quoted(key)}", max_results=1)
        if found:
            spec.run_id = found[0].info.run_id
            # Continue after the last logged epoch: a resumed trial never logs a step twice.
            history = client.get_metric_history(spec.run_id, "epoch")
            spec.last_step = max((m.step for m in history), default=0)
            # Reopened if it had ended; renamed if an earlier samtune named it otherwise (the name
            # is for reading: the key found it).
            status = "RUNNING" if found[0].info.status != "RUNNING" else None
            name = spec.name if found[0].info.run_name != spec.name else None
            if status is not None or name is not None:
                client.update_run(spec.run_id, status=status, name=name)
            return spec.run_id
        tags = dict(spec.tags)
        if spec.parent is not None:
            tags["mlflow.parentRunId"] = self.resolve(spec.parent)
        run = client.create_run(experiment, tags=tags, run_name=spec.name)
        spec.run_id = run.info.run_id
        return spec.run_id

    def retire_unknown_trials(self, cell_key: str, known: set[str]) -> list[str]:
        """Mark as lost every trial run under `cell_key` whose trial id is not in `known` (see
        `samtune.sweep.tracking.Tracker.retire_unknown_trials`); returns the keys retired."""
        client = self.client()
        runs = client.search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`{ROLE_TAG}` = 'trial' and tags.`{KEY_TAG}` LIKE {quoted(cell_key + '/%')}",
            max_results=10_000,
        )
        retired = []
        for run in runs:
            key = run.data.tags.get(KEY_TAG, "")
            if not key.startswith(cell_key + "/") or key.rsplit("/", 1)[-1] in known:
                continue
            client.set_tag(run.info.run_id, ROLE_TAG, "lost")
            client.set_tag(run.info.run_id, STATUS_TAG, "lost")
            client.set_tag(
                run.info.run_id,
                NOTE_TAG,
                "started by a sweep driver that was killed before Tune saved it; another trial ran in its place",
            )
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
            self.specs.pop(key, None)
            retired.append(key)
        return retired

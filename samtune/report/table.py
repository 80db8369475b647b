"""The sweep report: MLflow runs -> one tidy table -> every view in `dashboards/` -> one offline
HTML page plus a PNG per view, logged back to the sweep's MLflow run.

Reads the MLflow layout that `samtune.tracking` writes: trial runs tagged `samtune.role=trial`
(with `samtune.cell`, `samtune.status`, `samtune.trial_key`), params = the flat trial config,
per-epoch metrics with `step=epoch`; the sweep's parent run is tagged `samtune.role=sweep`.

Views. A view is a file `dashboards/<name>.py` that defines `view(runs: Runs) -> View`; its module
docstring's first line is the view's title, the first paragraph of text after it (on the next
line, or after a blank line as PEP 257 lays docstrings out) its caption, and an optional module
constant `ORDER` (int, default 100) places it on the page. Adding a file adds a
view; nothing else is edited. Where the views are looked for, first hit wins:

1. the `dashboards_dir` argument of `build` (a user's own views),
2. `<repo>/dashboards/` next to the `samtune/` package folder: a source checkout or an editable
   install, the place where a new view is added,
3. a `samtune.dashboards` package, if the build ships the same files as package data,
4. otherwise `build` raises `ReportError` naming the folders it tried.

Trials are counted by status. `finished` and `stopped` (stopped early by ASHA) trials carry
numbers and are plotted; `failed`, `diverged` and any other status are counted and listed on the
page, never plotted as numbers. A trial whose status says finished but whose last validation or
test error is not finite, or whose `diverged` metric is 1, counts as diverged; one that logged no
test error counts as incomplete. The validation error is optional (a trial trained with
`val_fraction=0` logs none): views that choose by it fall back to the test error where it is
missing, through `choice_metric`, and say so in a note.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from samtune.contract.keys import NUISANCE_KEYS
from samtune.contract.tags import CELL_TAG, STATUS_TAG, TRIAL_KEY_TAG
from samtune.report.runs import (
    _MLFLOW_STATUS,
    PLOTTED_STATUSES,
    Runs,
    TrialRecord,
    _parse_param,
)

# Fixed colours so that one optimizer looks the same in every view.
_OPTIMIZER_COLORS = {"SGD": "#444444", "SAM": "#1f77b4", "ASAM": "#ff7f0e",
                     "AdamW": "#7f7f7f", "SAM(AdamW)": "#2ca02c", "ASAM(AdamW)": "#d62728"}


_EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def effective_m(trials: pd.DataFrame) -> pd.Series:
    """The m-sharpness group size each trial used: `m`, or the per-worker batch where m is None
    (the contract's default, `batch_size // workers`). NaN where neither is known."""
    out = []
    for _, row in trials.iterrows():
        m = row.get("m")
        if m is not None and not (isinstance(m, float) and math.isnan(m)):
            out.append(float(m))
            continue
        batch, workers = row.get("batch_size"), row.get("workers") or 1
        if isinstance(batch, (int, float)) and not pd.isna(batch) and batch:
            out.append(float(int(batch) // int(workers)))
        else:
            out.append(float("nan"))
    return pd.Series(out, index=trials.index, dtype=float, name="m")


def _optimizer_label(params: Mapping[str, Any]) -> str:
    optimizer = str(params.get("optimizer", "sgd")).lower()
    base = str(params.get("base_optimizer", "sgd")).lower()
    name = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM"}.get(optimizer, optimizer)
    if base in ("sgd", "none", ""):
        return name
    base_name = {"adamw": "AdamW", "adam": "Adam"}.get(base, base)
    return base_name if optimizer == "sgd" else f"{name}({base_name})"


def optimizer_colors(labels: Iterable[str]) -> dict[str, str]:
    """A stable colour per optimizer label (SGD dark grey, SAM blue, ASAM orange...)."""
    colors, extra = {}, iter(_EXTRA_COLORS * 4)
    for label in sorted(set(labels)):
        colors[label] = _OPTIMIZER_COLORS.get(label) or next(extra)
    return colors


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def tabulate(
    experiment: str,
    records: Sequence[TrialRecord],
    *,
    tracking_uri: str | None = None,
    sweep_run_id: str | None = None,
) -> Runs:
    """Turn trial records into the tidy `Runs` table (see `Runs` for the columns).

    Per metric, a value logged twice for one epoch (a resumed trial) keeps the later one. A trial
    with no samtune.status tag takes MLflow's run state. Never raises on an empty list: the
    result then has no rows.
    """
    param_names: list[str] = []
    rows, history_rows = [], []
    for record in records:
        params = {k: _parse_param(v) for k, v in record.params.items()}
        for key in params:
            if key not in param_names:
                param_names.append(key)
        # Later values win for a repeated epoch: the list is in logging order.
        history = {key: dict(points) for key, points in record.history.items()}
        history.pop("epoch", None)  # the step already is the epoch
        status = record.tags.get(STATUS_TAG) or _MLFLOW_STATUS.get(record.run_status, "unknown")
        status = status.lower()
        row: dict[str, Any] = {
            "run_id": record.run_id,
            "trial_key": record.tags.get(TRIAL_KEY_TAG, record.run_id),
            "cell": record.tags.get(CELL_TAG) or _fallback_cell(params),
            "status": status,
            "start_time": record.start_time,
        }
        row.update(params)
        row["optimizer_label"] = _optimizer_label(params)
        row["config_key"] = json.dumps(
            {k: params[k] for k in sorted(params) if k != "seed"}, default=str, sort_keys=True
        )
        epochs = sorted({e for series in history.values() for e in series})
        row["epochs_run"] = max(epochs) if epochs else 0
        for key, series in history.items():
            if not series:
                continue
            last = series[max(series)]
            if key.startswith("sharpness/"):
                row[key] = last
            else:
                row[f"final_{key}"] = last
        # Without a validation split (val_fraction=0) only the test error can place the best
        # epoch; `best_by` says so, and views that choose by it say so on the page.
        best_by = "val_error" if history.get("val_error") else "test_error"
        val = {e: v for e, v in history.get(best_by, {}).items() if math.isfinite(v)}
        if val:
            best_epoch = min(val, key=lambda e: (val[e], e))  # earliest of equal minima
            row["best_epoch"] = best_epoch
            row["best_by"] = best_by
            for key, series in history.items():
                if not key.startswith("sharpness/") and best_epoch in series:
                    row[f"best_{key}"] = series[best_epoch]
        if status in PLOTTED_STATUSES:
            if row.get("final_diverged") == 1 or any(
                f"final_{k}" in row and not _finite(row[f"final_{k}"])
                for k in ("val_error", "test_error")
            ):
                row["status"] = status = "diverged"
            elif "final_test_error" not in row:
                # The validation error may be absent (val_fraction=0); the test error reports.
                row["status"] = status = "incomplete"
        rows.append(row)
        if status in PLOTTED_STATUSES:
            for epoch in epochs:
                point = {k: row[k] for k in ("run_id", "trial_key", "cell", "optimizer_label",
                                            "config_key")}
                point["epoch"] = epoch
                for key, series in history.items():
                    point[key] = series.get(epoch, float("nan"))
                history_rows.append(point)

    base_cols = ["run_id", "trial_key", "cell", "status", "epochs_run", "config_key",
                 "optimizer_label", "start_time"]
    trials = pd.DataFrame(rows, columns=None if rows else base_cols)
    # A config key missing from some trials (a conditional parameter) reads as None, as logged.
    for key in param_names:
        trials[key] = trials[key].astype(object).where(trials[key].notna(), None)
        trials[key] = _tidy_param_column(trials[key])
    history_df = pd.DataFrame(history_rows)
    if history_df.empty:
        history_df = pd.DataFrame(
            columns=["run_id", "trial_key", "cell", "optimizer_label", "config_key", "epoch"]
        )
    else:
        history_df = history_df.sort_values(["cell", "run_id", "epoch"], ignore_index=True)
    return Runs(
        experiment=experiment,
        trials=trials,
        history=history_df,
        param_names=tuple(param_names),
        tracking_uri=tracking_uri,
        sweep_run_id=sweep_run_id,
    )


def _tidy_param_column(column: pd.Series) -> pd.Series:
    """A param column of plain numbers becomes numeric; anything mixed stays object with None."""
    values = [v for v in column if v is not None]
    if values and len(values) == len(column) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        return pd.to_numeric(column)
    return column


def _fallback_cell(params: Mapping[str, Any]) -> str:
    scenario = params.get("scenario", "label_noise")
    if scenario == "label_noise":
        return f"noise={params.get('label_noise_rate', 0.0)}"
    return str(scenario)


def cell_order(trials: pd.DataFrame) -> list[str]:
    """Cells ordered by (scenario, label_noise_rate, name): label-noise cells by rising noise."""
    if trials.empty:
        return []
    keys = {}
    for cell, group in trials.groupby("cell", sort=False):
        first = group.iloc[0]
        scenario = str(first.get("scenario", "label_noise"))
        rate = first.get("label_noise_rate", 0.0)
        rate = float(rate) if _finite(rate) else 0.0
        keys[cell] = (scenario != "label_noise", scenario, rate, str(cell))
    return sorted(keys, key=keys.get)


def searched_hyperparameters(runs: Runs, trials: pd.DataFrame) -> list[str]:
    """Trial-config keys that take more than one value among `trials`, nuisance keys (seed,
    resources) excluded: the hyperparameters the sweep actually searched there."""
    names = []
    for key in runs.param_names:
        if key in NUISANCE_KEYS or key not in trials:
            continue
        if trials[key].map(repr).nunique() > 1:
            names.append(key)
    return names


def choice_metric(trials: pd.DataFrame, column: str) -> tuple[str, str | None]:
    """The column to choose configurations by among `trials`, and a note when it is not `column`.

    `column` is a validation-error column (`final_val_error`, `best_val_error`). Where every
    trial has a finite value of it, it is returned with no note. Otherwise (trials trained with
    `val_fraction=0` log no validation error) its test-error counterpart (`final_test_error`,
    `best_test_error`) is returned for all of them, so that one ranking never mixes the two, with
    a sentence for the page saying that the test set then takes part in the choice.
    Raises ValueError for a column that is not a validation-error column.
    """
    if "val_error" not in column:
        raise ValueError(f"choice_metric expects a validation-error column, got {column!r}")
    fallback = column.replace("val_error", "test_error")
    if trials.empty:
        return column, None
    values = pd.to_numeric(trials[column], errors="coerce") if column in trials else pd.Series(
        np.nan, index=trials.index)
    missing = int((~np.isfinite(values.to_numpy(dtype=float))).sum())
    if missing == 0:
        return column, None
    return fallback, (f"{missing} of {len(trials)} trials logged no validation error "
                      f"(val_fraction=0), so configurations are chosen by {fallback} instead of "
                      f"{column}: the test set takes part in the choice and the result is "
                      "optimistic.")


def best_per_optimizer(
    trials: pd.DataFrame, select_by: str, report: Sequence[str] = ()
) -> pd.DataFrame:
    """Per (cell, optimizer_label): the configuration with the lowest mean `select_by`.

    Seed repeats of one configuration (same `config_key`) are averaged first. Returns one row per
    (cell, optimizer_label) with config_key, n_seeds, `<select_by>` (the mean), and for every
    column in `report` its `<col>_mean` and `<col>_std` (std NaN for a single seed). Trials where
    `select_by` is not finite are ignored; an empty frame comes back if none is left.
    """
    report = list(report)
    columns = ["cell", "optimizer_label", "config_key", "n_seeds", select_by] + [
        f"{c}_{s}" for c in report for s in ("mean", "std")
    ]
    if trials.empty or select_by not in trials:
        return pd.DataFrame(columns=columns)
    usable = trials[np.isfinite(pd.to_numeric(trials[select_by], errors="coerce"))]
    rows = []
    for (cell, label), group in usable.groupby(["cell", "optimizer_label"], sort=False):
        per_config = []
        for config_key, seeds in group.groupby("config_key", sort=False):
            entry = {
                "cell": cell,
                "optimizer_label": label,
                "config_key": config_key,
                "n_seeds": len(seeds),
                select_by: float(pd.to_numeric(seeds[select_by]).mean()),
            }
            for col in report:
                values = pd.to_numeric(seeds[col], errors="coerce") if col in seeds else pd.Series(
                    dtype=float)
                entry[f"{col}_mean"] = float(values.mean()) if len(values) else float("nan")
                entry[f"{col}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float(
                    "nan")
            per_config.append(entry)
        rows.append(min(per_config, key=lambda e: e[select_by]))
    return pd.DataFrame(rows, columns=columns)

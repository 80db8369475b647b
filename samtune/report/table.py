"""Tabulation and the choices views make: trial records into the tidy `Runs` table (`tabulate`,
which also settles each trial's status), and what the views in `dashboards/` share: the order of
cells, the hyperparameters a sweep searched, the metric to choose configurations by, the best
configuration per optimizer, the m-sharpness group each trial used, a colour per optimizer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from samtune.contract.keys import NUISANCE_KEYS, optimizer_label
from samtune.contract.metrics import is_sharpness_setting, sharpness_settings
from samtune.contract.tags import CELL_TAG, STATUS_TAG, TRIAL_KEY_TAG
from samtune.report.runs import PLOTTED_STATUSES, Runs, TrialRecord

# MLflow's own run states, for trials that never set samtune.status (e.g. a crashed process).
_MLFLOW_STATUS = {
    "FINISHED": "finished",
    "FAILED": "failed",
    "KILLED": "killed",
    "RUNNING": "running",
    "SCHEDULED": "running",
}

# Fixed colours so that one optimizer looks the same in every view.
_OPTIMIZER_COLORS = {
    "SGD": "#444444",
    "SAM": "#1f77b4",
    "ASAM": "#ff7f0e",
    "AdamW": "#7f7f7f",
    "SAM(AdamW)": "#2ca02c",
    "ASAM(AdamW)": "#d62728",
}


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

    >>> record = TrialRecord("r1", {"optimizer": "sam", "lr": "0.1", "seed": "0"},
    ...                      {"samtune.status": "finished"},
    ...                      {"val_error": [(1, 0.5), (2, 0.3)], "test_error": [(1, 0.6), (2, 0.4)]})
    >>> row = tabulate("demo", [record]).trials.iloc[0]
    >>> row["optimizer_label"], row["status"], int(row["best_epoch"]), float(row["final_test_error"])
    ('SAM', 'finished', 2, 0.4)
    >>> len(tabulate("demo", []).trials)
    0
    """
    param_names: list[str] = []
    rows, history_rows = [], []
    for record in records:
        # The sharpness settings are no trial setting (the config's are `sharpness_*`): columns of
        # their own, never part of a configuration's identity.
        params = {k: _parse_param(v) for k, v in record.params.items() if not is_sharpness_setting(k)}
        param_names += [key for key in params if key not in param_names]
        # Later values win for a repeated epoch: the list is in logging order.
        history = {key: dict(points) for key, points in record.history.items()}
        history.pop("epoch", None)  # the step already is the epoch
        settings = _sharpness_settings(record.params, history)
        row, status = _trial_row(record, params, history)
        row.update(settings)
        rows.append(row)
        if status in PLOTTED_STATUSES:
            history_rows += _history_points(row, history)
    return Runs(
        experiment=experiment,
        trials=_trials_frame(rows, param_names),
        history=_history_frame(history_rows),
        param_names=tuple(param_names),
        tracking_uri=tracking_uri,
        sweep_run_id=sweep_run_id,
    )


def _sharpness_settings(params: Mapping[str, str], history: dict[str, dict[int, float]]) -> dict[str, float]:
    """A trial's sharpness settings as the measurement reported them, one column each: from its
    params (`samtune.contract.metrics.sharpness_params`), and for a run of an older sweep, which
    logged them as metric series, their last value, taken out of `history`."""
    settings = {key: series[max(series)] for key, series in history.items() if is_sharpness_setting(key) and series}
    for key in [k for k in history if is_sharpness_setting(k)]:
        del history[key]
    settings.update(sharpness_settings(params))
    return settings


def _parse_param(value: str) -> Any:
    """MLflow stores params as str(value); invert that for None, bools, ints and floats."""
    if value == "None":
        return None
    if value in ("True", "False"):
        return value == "True"
    if re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def _trial_row(
    record: TrialRecord, params: dict[str, Any], history: dict[str, dict[int, float]]
) -> tuple[dict[str, Any], str]:
    """One row of `Runs.trials` and the trial's settled status (see `_settled_status`)."""
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
    row["optimizer_label"] = optimizer_label(params)
    row["config_key"] = json.dumps({k: params[k] for k in sorted(params) if k != "seed"}, default=str, sort_keys=True)
    epochs = _epochs(history)
    row["epochs_run"] = max(epochs) if epochs else 0
    row.update(_last_values(history))
    row.update(_best_epoch_values(history))
    settled = _settled_status(row, status)
    if settled != status:
        row["status"] = status = settled
    return row, status


def _epochs(history: dict[str, dict[int, float]]) -> list[int]:
    return sorted({e for series in history.values() for e in series})


def _last_values(history: dict[str, dict[int, float]]) -> dict[str, float]:
    """Each metric's value at the trial's last epoch: `final_<metric>`, and `sharpness/<key>` as
    logged (sharpness is measured at some epochs only, so its last value is its only summary)."""
    out = {}
    for key, series in history.items():
        if not series:
            continue
        last = series[max(series)]
        out[key if key.startswith("sharpness/") else f"final_{key}"] = last
    return out


def _best_epoch_values(history: dict[str, dict[int, float]]) -> dict[str, Any]:
    """`best_epoch`, `best_by` and every metric at that epoch as `best_<metric>`; {} when no
    epoch has a finite error to choose by."""
    # Without a validation split (val_fraction=0) only the test error can place the best
    # epoch; `best_by` says so, and views that choose by it say so on the page.
    best_by = "val_error" if history.get("val_error") else "test_error"
    val = {e: v for e, v in history.get(best_by, {}).items() if math.isfinite(v)}
    if not val:
        return {}
    best_epoch = min(val, key=lambda e: (val[e], e))  # earliest of equal minima
    out: dict[str, Any] = {"best_epoch": best_epoch, "best_by": best_by}
    for key, series in history.items():
        if not key.startswith("sharpness/") and best_epoch in series:
            out[f"best_{key}"] = series[best_epoch]
    return out


def _settled_status(row: dict[str, Any], status: str) -> str:
    """A trial reported finished or stopped whose numbers say otherwise: `diverged` (its last
    error is not finite, or it logged diverged=1) or `incomplete` (no test error)."""
    if status not in PLOTTED_STATUSES:
        return status
    if row.get("final_diverged") == 1 or any(
        f"final_{k}" in row and not _finite(row[f"final_{k}"]) for k in ("val_error", "test_error")
    ):
        return "diverged"
    if "final_test_error" not in row:
        # The validation error may be absent (val_fraction=0); the test error reports.
        return "incomplete"
    return status


def _history_points(row: dict[str, Any], history: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """The rows of `Runs.history` for one plotted trial: one per epoch, NaN where a metric has
    no value at that epoch."""
    points = []
    for epoch in _epochs(history):
        point = {k: row[k] for k in ("run_id", "trial_key", "cell", "optimizer_label", "config_key")}
        point["epoch"] = epoch
        for key, series in history.items():
            point[key] = series.get(epoch, float("nan"))
        points.append(point)
    return points


def _trials_frame(rows: list[dict[str, Any]], param_names: list[str]) -> pd.DataFrame:
    base_cols = ["run_id", "trial_key", "cell", "status", "epochs_run", "config_key", "optimizer_label", "start_time"]
    trials = pd.DataFrame(rows, columns=None if rows else base_cols)
    # A config key missing from some trials (a conditional parameter) reads as None, as logged.
    for key in param_names:
        trials[key] = trials[key].astype(object).where(trials[key].notna(), None)
        trials[key] = _tidy_param_column(trials[key])
    return trials


def _history_frame(history_rows: list[dict[str, Any]]) -> pd.DataFrame:
    history_df = pd.DataFrame(history_rows)
    if history_df.empty:
        return pd.DataFrame(columns=["run_id", "trial_key", "cell", "optimizer_label", "config_key", "epoch"])
    return history_df.sort_values(["cell", "run_id", "epoch"], ignore_index=True)


def _tidy_param_column(column: pd.Series) -> pd.Series:
    """A param column of plain numbers becomes numeric; anything mixed stays object with None."""
    values = [v for v in column if v is not None]
    if (
        values
        and len(values) == len(column)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
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
    keys: dict[str, tuple[bool, str, float, str]] = {}
    for cell, group in trials.groupby("cell", sort=False):
        first = group.iloc[0]
        scenario = str(first.get("scenario", "label_noise"))
        rate = first.get("label_noise_rate", 0.0)
        rate = float(rate) if _finite(rate) else 0.0
        keys[cell] = (scenario != "label_noise", scenario, rate, str(cell))
    return sorted(keys, key=keys.__getitem__)


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
    values = (
        pd.to_numeric(trials[column], errors="coerce") if column in trials else pd.Series(np.nan, index=trials.index)
    )
    missing = int((~np.isfinite(values.to_numpy(dtype=float))).sum())
    if missing == 0:
        return column, None
    return fallback, (
        f"{missing} of {len(trials)} trials logged no validation error "
        f"(val_fraction=0), so configurations are chosen by {fallback} instead of "
        f"{column}: the test set takes part in the choice and the result is "
        "optimistic."
    )


def best_per_optimizer(
    trials: pd.DataFrame, select_by: str, report: Sequence[str] = (), prefer: Collection[str] = ()
) -> pd.DataFrame:
    """Per (cell, optimizer_label): the configuration with the lowest mean `select_by`.

    Seed repeats of one configuration (same `config_key`) are averaged first. A tie goes to the
    configuration the search suggested first (lowest `trial_number`), the rule the sweep picks
    by (`samtune.sweep.results.CellResult.best`), so a view never draws one of two tied trials
    while the confirmation stage ran the other. A configuration one of whose trials is in
    `prefer` (trial keys: the sweep's recorded picks, `Runs.picked`) is chosen in its group
    whatever its value. Returns one row per (cell, optimizer_label) with config_key, n_seeds,
    `<select_by>` (the mean), and for every column in `report` its `<col>_mean` and `<col>_std`
    (std NaN for a single seed). Trials where `select_by` is not finite are ignored; an empty
    frame comes back if none is left.
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
        # (not a pick, mean value, first trial number, order seen, the row): the first wins.
        per_config: list[tuple[bool, float, float, int, dict[str, Any]]] = []
        for config_key, seeds in group.groupby("config_key", sort=False):
            entry = {
                "cell": cell,
                "optimizer_label": label,
                "config_key": config_key,
                "n_seeds": len(seeds),
                select_by: float(pd.to_numeric(seeds[select_by]).mean()),
            }
            for col in report:
                values = pd.to_numeric(seeds[col], errors="coerce") if col in seeds else pd.Series(dtype=float)
                entry[f"{col}_mean"] = float(values.mean()) if len(values) else float("nan")
                entry[f"{col}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            order = pd.to_numeric(seeds["trial_number"], errors="coerce") if "trial_number" in seeds else None
            first = float(order.min()) if order is not None and order.notna().any() else math.inf
            picked = "trial_key" in seeds and bool(seeds["trial_key"].isin(list(prefer)).any())
            per_config.append((not picked, entry[select_by], first, len(per_config), entry))
        rows.append(min(per_config, key=lambda ranked: ranked[:4])[4])
    return pd.DataFrame(rows, columns=columns)

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

import base64
import datetime as _dt
import html
import importlib.util
import io
import json
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "NoFinishedTrialsError",
    "Report",
    "ReportError",
    "Runs",
    "TrialRecord",
    "View",
    "ViewSpec",
    "best_per_optimizer",
    "build",
    "choice_metric",
    "build_report",
    "cell_order",
    "discover_views",
    "effective_m",
    "load_runs",
    "optimizer_colors",
    "render_views",
    "searched_hyperparameters",
    "tabulate",
    "write_report",
]

log = logging.getLogger(__name__)

ROLE_TAG = "samtune.role"
CELL_TAG = "samtune.cell"
STATUS_TAG = "samtune.status"
TRIAL_KEY_TAG = "samtune.trial_key"

# Statuses whose numbers mean something: "stopped" is an ASHA early stop, a real but shorter run.
PLOTTED_STATUSES = ("finished", "stopped")

# Config keys that vary between trials without being a hyperparameter of the study: the seed is
# noise to average over, the rest are resources and bookkeeping (`baseline` marks a cell's
# baseline trials, which ASHA lets run their budget).
NUISANCE_KEYS = frozenset(
    {"seed", "data_root", "workers", "use_gpu", "sharpness_every", "sharpness_subset", "baseline"}
)

# Keys `sharpness/<key>` that samtune.sharpness.measure_sharpness logs beside the measures (its
# SHARED_KEYS; copied, not imported, so that a report does not load torch; a test checks that
# they agree): what was measured on, not a measure.
SHARPNESS_SHARED_KEYS = frozenset({"subset", "seed", "batch", "num_params"})

# MLflow's own run states, for trials that never set samtune.status (e.g. a crashed process).
_MLFLOW_STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed",
                  "RUNNING": "running", "SCHEDULED": "running"}

# Fixed colours so that one optimizer looks the same in every view.
_OPTIMIZER_COLORS = {"SGD": "#444444", "SAM": "#1f77b4", "ASAM": "#ff7f0e",
                     "AdamW": "#7f7f7f", "SAM(AdamW)": "#2ca02c", "ASAM(AdamW)": "#d62728"}
_EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")

_VIEWS_FOLDER = "dashboards"


class ReportError(ValueError):
    """A report cannot be built from what the user asked for; the message is one line."""


class NoFinishedTrialsError(ReportError):
    """The experiment exists but has no trial with numbers to plot."""


# -- the runs table ------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One trial run as read from MLflow, before tabulation.

    `params` are the logged strings, `history` maps a metric name to `(epoch, value)` pairs and
    `run_status` is MLflow's own state (FINISHED, FAILED, ...).
    """

    run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]]
    run_status: str = "FINISHED"
    start_time: int | None = None


@dataclass
class Runs:
    """Every trial of one experiment, tidy.

    `trials` has one row per trial run, every status included, with columns:
    run_id, trial_key, cell, status, epochs_run, config_key (the config without the seed: trials
    with the same config_key are seed repeats), optimizer_label ("SGD", "SAM", "ASAM",
    "SAM(AdamW)"...), one column per trial-config key (parsed back from MLflow's strings:
    numbers, bools, None), `final_<metric>` (value at the trial's last epoch), `best_epoch` (the
    epoch of lowest val_error; of lowest test_error where the trial logged no val_error),
    `best_by` (which of the two chose it) and `best_<metric>` (value at that epoch), and one
    column per sharpness key `sharpness/<key>` (its last measured value).

    `history` has one row per (trial, epoch): run_id, trial_key, cell, optimizer_label,
    config_key, epoch and one column per per-epoch metric. Only plotted trials appear in it.
    """

    experiment: str
    trials: pd.DataFrame
    history: pd.DataFrame
    param_names: tuple[str, ...]
    tracking_uri: str | None = None
    sweep_run_id: str | None = None

    @property
    def plotted(self) -> pd.DataFrame:
        """Trials whose numbers are plotted: status finished or stopped."""
        return self.trials[self.trials["status"].isin(PLOTTED_STATUSES)]

    @property
    def excluded(self) -> pd.DataFrame:
        """Trials that are counted and listed but never plotted (failed, diverged, running...)."""
        return self.trials[~self.trials["status"].isin(PLOTTED_STATUSES)]

    def status_counts(self) -> dict[str, int]:
        """Number of trials per status, most frequent first (ties by name)."""
        counts = self.trials["status"].value_counts()
        return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}

    @property
    def sharpness_measures(self) -> list[str]:
        """Measure names logged as `sharpness/<measure>` with at least one finite value.

        Settings logged alongside (`sharpness/<measure>/<setting>`, `sharpness/params/<name>`)
        and what the measurement was made on (`sharpness/subset`, `/seed`, `/batch`,
        `/num_params`) are not measures.
        """
        names = []
        for col in self.trials.columns:
            if (col.startswith("sharpness/") and col.count("/") == 1
                    and col.split("/", 1)[1] not in SHARPNESS_SHARED_KEYS):
                values = pd.to_numeric(self.plotted[col], errors="coerce")
                if np.isfinite(values).any():
                    names.append(col.split("/", 1)[1])
        return sorted(names)


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


# -- views ---------------------------------------------------------------------------------------


@dataclass
class View:
    """What a view returns: the figure and the numbers behind it.

    `data` maps a name to a tidy DataFrame (tests check these, not pixels); `notes` are
    sentences shown under the figure (what was skipped and why). `figure` may be None when the
    runs hold nothing for this view (the notes then say why).
    """

    figure: Any  # matplotlib.figure.Figure | None
    data: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ViewSpec:
    """A view file found on disk: its name (file stem), title, caption and function."""

    name: str
    title: str
    caption: str
    order: int
    path: Path
    function: Callable[[Runs], View]


@dataclass
class RenderedView:
    spec: ViewSpec
    view: View | None
    error: str | None = None


def _view_folders(dashboards_dir: str | Path | None) -> list[Path]:
    if dashboards_dir is not None:
        return [Path(dashboards_dir)]
    folders = [Path(__file__).resolve().parent.parent / _VIEWS_FOLDER]
    spec = importlib.util.find_spec("samtune.dashboards")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) for p in spec.submodule_search_locations]
    return folders


def discover_views(dashboards_dir: str | Path | None = None) -> list[ViewSpec]:
    """Load every `*.py` (not starting with `_`) of the first views folder that exists.

    Folders tried in order: `dashboards_dir`, `<repo>/dashboards` next to the package, the
    `samtune.dashboards` package. Raises `ReportError` if none exists or it holds no view, and
    if a file lacks a `view` function.
    """
    tried = _view_folders(dashboards_dir)
    folder = next((f for f in tried if f.is_dir()), None)
    if folder is None:
        raise ReportError(
            "no views folder found; tried " + ", ".join(str(f) for f in tried)
        )
    specs = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = _load_module(path)
        function = getattr(module, "view", None)
        if not callable(function):
            raise ReportError(f"view file {path} defines no function view(runs) -> View")
        title, caption = _title_and_caption(module.__doc__ or path.stem)
        specs.append(ViewSpec(
            name=path.stem,
            title=title,
            caption=caption,
            order=int(getattr(module, "ORDER", 100)),
            path=path,
            function=function,
        ))
    if not specs:
        raise ReportError(f"views folder {folder} holds no view file (*.py)")
    return sorted(specs, key=lambda s: (s.order, s.name))


def _title_and_caption(doc: str) -> tuple[str, str]:
    """A view docstring's first line (its final period dropped) and the first paragraph after
    it, joined into one line; "" where there is no such paragraph."""
    title, _, rest = doc.strip().partition("\n")
    paragraphs = [p for p in re.split(r"\n\s*\n", rest.strip()) if p.strip()]
    caption = " ".join(paragraphs[0].split()) if paragraphs else ""
    return title.strip().rstrip("."), caption


def _load_module(path: Path) -> ModuleType:
    name = f"samtune_dashboards.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ReportError(f"cannot load view file {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses and pickling look the module up by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def render_views(runs: Runs, specs: Sequence[ViewSpec], *, strict: bool = False) -> list[RenderedView]:
    """Run every view on `runs`. A view that raises is shown on the page as failed (with its
    error) so that one broken view does not hide the others; `strict=True` re-raises instead."""
    rendered = []
    for spec in specs:
        try:
            view = spec.function(runs)
            if not isinstance(view, View):
                raise TypeError(f"view {spec.name} returned {type(view).__name__}, expected View")
            rendered.append(RenderedView(spec, view))
        except Exception as exc:  # noqa: BLE001 - reported on the page, re-raised when strict
            if strict:
                raise
            log.warning("view %s failed: %s", spec.name, exc, exc_info=True)
            rendered.append(RenderedView(spec, None, f"{type(exc).__name__}: {exc}"))
    return rendered


# -- the page ------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1300px;padding:0 1em;color:#222;background:#fff}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}th{background:#f4f4f4}
img{max-width:100%;height:auto;border:1px solid #eee}
.caption{color:#444}.note{color:#7a4b00}.error{color:#b00020;font-weight:bold}
details{margin:.4em 0}summary{cursor:pointer;color:#333}
nav a{margin-right:1em}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_MAX_TABLE_ROWS = 60


def _table(df: pd.DataFrame) -> str:
    shown = df.head(_MAX_TABLE_ROWS)
    text = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
    if len(df) > len(shown):
        text += f"<p>first {len(shown)} of {len(df)} rows</p>"
    return text


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_report(runs: Runs, rendered: Sequence[RenderedView], out: str | Path) -> Path:
    """Write `index.html` (self-contained: PNGs inlined as data URIs, CSS inline, no external
    resource of any kind), `<view>.png` per view with a figure, and `trials.csv` /
    `history.csv` (the tidy tables) into `out`. Returns the path of index.html.

    Other files in `out` are left alone, except `<view>.png` of a view that now draws no figure
    (or failed): that one is removed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    counts = runs.status_counts()
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # The page must open offline: the browser itself refuses anything not inline.
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>samtune report: {esc(runs.experiment)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>samtune report: {esc(runs.experiment)}</h1>",
        "<p>"
        + f"{len(runs.trials)} trial runs: "
        + ", ".join(f"{n} {esc(s)}" for s, n in counts.items())
        + f". {len(runs.plotted)} plotted (finished or stopped early)."
        + f" Cells: {esc(', '.join(cell_order(runs.plotted)))}.</p>",
        f"<p>Tracking URI: <code>{esc(str(runs.tracking_uri))}</code>. Generated "
        f"{_dt.datetime.now().isoformat(timespec='seconds')}.</p>",
        "<nav>" + "".join(
            f'<a href="#{esc(r.spec.name)}">{esc(r.spec.title)}</a>' for r in rendered
        ) + '<a href="#excluded">Excluded trials</a></nav>',
    ]
    for item in rendered:
        spec = item.spec
        if item.view is None or item.view.figure is None:
            # A PNG left by an earlier build would sit beside a page that no longer shows it.
            (out / f"{spec.name}.png").unlink(missing_ok=True)
        parts.append(f'<section id="{esc(spec.name)}"><h2>{esc(spec.title)}</h2>')
        if spec.caption:
            parts.append(f'<p class="caption">{esc(spec.caption)}</p>')
        if item.error is not None:
            parts.append(f'<p class="error">This view failed: {esc(item.error)}</p></section>')
            continue
        view = item.view
        assert view is not None
        if view.figure is not None:
            png = _png(view.figure)
            (out / f"{spec.name}.png").write_bytes(png)
            data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            parts.append(f'<img alt="{esc(spec.title)}" src="{data_uri}">')
            _close(view.figure)
        for note in view.notes:
            parts.append(f'<p class="note">{esc(note)}</p>')
        for name, df in view.data.items():
            parts.append(f"<details><summary>{esc(name)} ({len(df)} rows)</summary>"
                         f"{_table(df)}</details>")
        parts.append("</section>")
    excluded = runs.excluded
    parts.append('<section id="excluded"><h2>Excluded trials</h2>')
    if excluded.empty:
        parts.append("<p>None: every trial finished or was stopped early.</p>")
    else:
        parts.append(f"<p>{len(excluded)} trials carry no plottable numbers and are left out of "
                     "every figure.</p>")
        parts.append(_table(_excluded_table(runs)))
    parts.append("</section></body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    runs.trials.to_csv(out / "trials.csv", index=False)
    runs.history.to_csv(out / "history.csv", index=False)
    return index


def _excluded_table(runs: Runs) -> pd.DataFrame:
    columns = ["trial_key", "cell", "status", "optimizer_label", "epochs_run", "run_id"]
    return runs.excluded[[c for c in columns if c in runs.excluded]].reset_index(drop=True)


def _close(figure: Any) -> None:
    # Figures made with pyplot stay registered until closed; plain Figure objects just drop.
    import matplotlib.pyplot as plt

    plt.close(figure)


# -- the whole thing -----------------------------------------------------------------------------


def _default_out(experiment: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return Path("reports") / safe


@dataclass
class Report:
    """A built report: the runs table, every view as rendered, and the files written."""

    runs: Runs
    views: list[RenderedView]
    index: Path
    files: list[Path]


def build_report(
    experiment: str,
    tracking_uri: str | None = None,
    out: str | Path | None = None,
    *,
    dashboards_dir: str | Path | None = None,
    log_artifacts: bool = True,
    strict: bool = False,
    all_sweeps: bool = False,
) -> Report:
    """Build the report of one sweep; `build` does the same and returns only the page's path.

    Reads the trial runs of MLflow experiment `experiment`'s newest sweep (every sweep of that
    name with `all_sweeps=True`; see `load_runs`; `tracking_uri=None`: MLflow's own resolution), runs every view (see the module docstring for where views are found), writes
    index.html, one PNG per view with a figure and the tidy tables (trials.csv, history.csv)
    into `out` (default `reports/<experiment>/`), and logs those files, and nothing else of
    `out`, under `report/` as artifacts of the sweep's parent run (the newest run tagged
    samtune.role=sweep; skipped with a log message where there is none, or when
    `log_artifacts=False`).

    Raises:
        ReportError: no experiment of that name, or no views folder.
        NoFinishedTrialsError: the experiment has no finished (or early-stopped) trial.
        Exception: whatever a view raises, only when `strict=True`; otherwise the page shows it.
    """
    import matplotlib

    # Headless: a report is often built on a server or in CI with no display.
    matplotlib.use("Agg")
    runs = load_runs(experiment, tracking_uri, all_sweeps=all_sweeps)
    if runs.plotted.empty:
        counts = runs.status_counts()
        what = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trial runs yet"
        raise NoFinishedTrialsError(
            f"experiment {experiment!r} has no finished trial to report ({what})"
        )
    specs = discover_views(dashboards_dir)
    with warnings.catch_warnings():
        # Views fit on few trials by design; their caveats go into the notes, not the console.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        rendered = render_views(runs, specs, strict=strict)
    index = write_report(runs, rendered, out if out is not None else _default_out(experiment))
    files = [index, index.parent / "trials.csv", index.parent / "history.csv"] + [
        index.parent / f"{r.spec.name}.png" for r in rendered
        if r.view is not None and r.view.figure is not None
    ]
    if log_artifacts:
        if runs.sweep_run_id is None:
            log.info("no sweep run (tag %s=sweep) in %r; report not logged to MLflow",
                     ROLE_TAG, experiment)
        else:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=runs.tracking_uri)
            # File by file: `out` may be a folder that holds more than this report.
            for path in files:
                client.log_artifact(runs.sweep_run_id, str(path), artifact_path="report")
    return Report(runs=runs, views=list(rendered), index=index, files=files)


def build(
    experiment: str,
    tracking_uri: str | None = None,
    out: str | Path | None = None,
    *,
    dashboards_dir: str | Path | None = None,
    log_artifacts: bool = True,
    strict: bool = False,
    all_sweeps: bool = False,
) -> Path:
    """Build the report of one sweep and return the path of its index.html.

    Same arguments, behaviour and errors as `build_report`.
    """
    return build_report(experiment, tracking_uri, out, dashboards_dir=dashboards_dir,
                        log_artifacts=log_artifacts, strict=strict, all_sweeps=all_sweeps).index

"""Sensitivity: how the error moves with rho, m and the learning rate, per cell.

First, where the sweep ran ablations (`samtune.sweep.ablations`): one panel per ablated setting
and cell, the confirmed pick with that one setting moved, each point the test error's mean over
the confirmation seeds with its 95% interval; the optimum (the pick itself) starred, the robust
range shaded (the values no worse than the optimum by more than the sweep's equivalence margin:
the upper end of their difference from it, paired by seed, within the margin on the verdicts'
own interval, the sequential design's level at the look the seeds reach; the claims view's
"rho = 0.05 is as good as the searched rho" is this decision at rho 0.05), and the SAM paper's
default marked (rho = 0.05; m the whole batch). A sweep without ablations says what would add them.

Then one row per cell, from the search's trials (one seed each, so no intervals): the lowest
final validation error reached in each (rho, m) square among SAM trials, binned where a
hyperparameter takes many values (each square also gives its trial count); final validation
error against learning rate, every trial, by optimizer; and, only in a cell with at least
`MIN_FINISHED_FOR_IMPORTANCE` trials that ran their whole budget (else one note says why not),
hyperparameter importance from Optuna's fANOVA and PED-ANOVA evaluators: for SAM's final
validation error, and across optimizers (on the optimizer and the hyperparameters all
optimizers search; never the optimizer alone). Trials that logged no validation error
(val_fraction=0) are judged by final test error instead, as a note then says.

Importance is computed on the SAM-family trials of a cell (SAM and ASAM; every trial where the
cell has none) that ran their whole budget (ASHA-stopped trials carry an earlier epoch's error,
so they are left out), over the hyperparameters that vary there (seed, resources and constants
left out), by rebuilding an in-memory Optuna study from those trials. `m=None` counts as the
per-worker batch it stands for. Distributions are inferred from the values seen: numbers become
float (or int) ranges, log-scaled when positive and spanning a factor of 10 or more; anything
else categorical.
"""

from __future__ import annotations

import math
import warnings

import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from samtune.contract.keys import PAPER_BASELINES, STUDY_KEYS
from samtune.report.answers import verdicts
from samtune.report.runs import Runs
from samtune.report.table import cell_order, choice_metric, effective_m, optimizer_colors, searched_hyperparameters
from samtune.report.views import View
from samtune.verdicts import RULES

ORDER = 20

# What the sweep itself minimises (Tune hands OptunaSearch the last reported val_error).
OBJECTIVE = "final_val_error"
# Few enough squares that each one holds trials in a sweep of tens of trials.
MAX_BINS = 6
# Below this, fANOVA's forest and PED-ANOVA's top quantile hold too few trials to mean much.
MIN_TRIALS_FOR_IMPORTANCE = 8
# A cell's finished trials below which no importance is drawn at all: with fewer, the rankings
# of a few trials move with the seed more than with the settings, and a bar chart would hide it.
MIN_FINISHED_FOR_IMPORTANCE = 20
# PED-ANOVA compares the top quantile against all trials; its authors advise >= 5 trials in the
# top quantile, so the quantile grows for small cells (capped at half).
PED_ANOVA_TOP_TRIALS = 5
SAM_FAMILY = ("sam", "asam")
IMPORTANCE_COLUMNS = ["cell", "scope", "evaluator", "param", "importance", "n_trials"]


def view(runs: Runs) -> View:
    plotted = runs.plotted
    cells = cell_order(plotted)
    curves, curve_notes = _curves(runs)
    curve_rows = math.ceil(len(curves) / 4) if len(curves) else 0
    figure = Figure(figsize=(21, 4.3 * (len(cells) + curve_rows)), layout="constrained")
    axes = np.atleast_2d(figure.subplots(len(cells) + curve_rows, 4, squeeze=False))
    for ax, (cell, key, curve, rule) in zip(axes[:curve_rows].ravel(), curves):
        _draw_curve(ax, cell, key, curve, rule)
    for ax in axes[:curve_rows].ravel()[len(curves) :]:
        ax.set_axis_off()
    heatmaps, slices, importances, notes, objectives = [], [], [], list(curve_notes), set()
    for row, cell in zip(axes[curve_rows:], cells):
        trials = plotted[plotted["cell"] == cell]
        objective, note = choice_metric(trials, OBJECTIVE)
        objectives.add(objective)
        if note:
            notes.append(f"{cell}: {note}")
        family = _sam_family(trials)
        heatmap, rho_labels, m_labels = _heatmap(trials[family], cell, objective)
        heatmaps.append(heatmap)
        _draw_heatmap(row[0], heatmap, rho_labels, m_labels, cell, trials, objective)
        slice_ = trials[["cell", "trial_key", "optimizer_label"]].copy()
        slice_["lr"] = pd.to_numeric(trials["lr"], errors="coerce") if "lr" in trials else np.nan
        slice_["val_error"] = pd.to_numeric(trials[objective], errors="coerce")
        slice_["objective"] = objective
        slices.append(slice_)
        _draw_slice(row[1], slice_, optimizer_colors(plotted["optimizer_label"]), cell, objective)
        found, found_notes = _cell_importances(runs, trials, family, cell, objective, row[2:])
        importances += found
        notes += found_notes
    what = " / ".join(sorted(objectives)) or OBJECTIVE
    figure.suptitle(f"{runs.experiment}: sensitivity of {what}" + (" (ablation curves first)" if curves else ""))
    data = {
        "curves": _curve_frame(curves),
        "heatmap": _concat(heatmaps),
        "importance": _concat(importances),
        "slice": _concat(slices),
    }
    return View(figure=figure, data=data, notes=notes)


def _cell_importances(
    runs: Runs, trials: pd.DataFrame, family: pd.Series, cell: str, objective: str, axes
) -> tuple[list[pd.DataFrame], list[str]]:
    """A cell's two importances (SAM family; across optimizers) drawn on ``axes``, only where
    the cell has `MIN_FINISHED_FOR_IMPORTANCE` trials that ran their whole budget: an
    ASHA-stopped trial's error is that of an earlier epoch, and fed in as a finished value it
    would teach the evaluators that whatever it was configured with is good (or bad) for no
    real reason. Otherwise one note says why they are not drawn."""
    finished = trials["status"] == "finished"
    if finished.sum() < MIN_FINISHED_FOR_IMPORTANCE:
        for ax in axes:
            ax.set_axis_off()
        return [], [
            f"{cell}: no importance panels: {int(finished.sum())} trials ran their whole budget, and "
            f"fANOVA and PED-ANOVA need at least {MIN_FINISHED_FOR_IMPORTANCE} to rank anything but "
            "noise (more trials per cell: --set trials=N); the ablation curves are the sensitivity "
            "with intervals."
        ]
    notes = []
    pool = trials[family & finished] if family.any() else trials[finished]
    scope = "SAM family" if family.any() else "all trials"
    sam_family, note = _importance(runs, pool, cell, objective, scope=scope)
    notes += [note] if note else []
    _draw_importance(axes[0], sam_family, cell, note, objective, scope)
    # Across optimizers: SAM-family importance cannot say how much the optimizer itself
    # matters, so a second importance runs over every finished trial of the cell, on the
    # hyperparameters every optimizer has.
    common = _common_hyperparameters(runs, trials[finished], family[finished])
    if common:
        across, note = _importance(runs, trials[finished], cell, objective, params=common, scope="all optimizers")
    else:
        across = pd.DataFrame(columns=IMPORTANCE_COLUMNS)
        note = (
            f"{cell}: no importance across optimizers (it needs SAM-family and other trials, and "
            "a hyperparameter besides the optimizer that both search)."
        )
    notes += [note] if note else []
    _draw_importance(axes[1], across, cell, note, objective, "all optimizers")
    return [sam_family, across], notes


def _label(objective: str) -> str:
    return "val error" if "val_error" in objective else "test error"


def _sam_family(trials: pd.DataFrame) -> pd.Series:
    """True for the SAM and ASAM trials (whatever base optimizer they wrap)."""
    if "optimizer" not in trials:
        return pd.Series(False, index=trials.index)
    return trials["optimizer"].astype(str).str.lower().isin(SAM_FAMILY)


def _common_hyperparameters(runs: Runs, trials: pd.DataFrame, family: pd.Series) -> list[str]:
    """What an importance across optimizers may use: the optimizer choice itself (optimizer,
    base_optimizer) where it varies, and every hyperparameter searched both among the SAM-family
    trials and among the others. A SAM-only knob (rho, m) is left out: for SGD it is a logged
    default that does nothing, and it would be credited with the optimizer's effect."""
    if not family.any() or family.all():
        return []
    searched = searched_hyperparameters(runs, trials)
    in_sam = set(searched_hyperparameters(runs, trials[family]))
    in_other = set(searched_hyperparameters(runs, trials[~family]))
    keep = [p for p in searched if p in ("optimizer", "base_optimizer") or (p in in_sam and p in in_other)]
    choice = [p for p in keep if p in ("optimizer", "base_optimizer")]
    # The optimizer alone would get all the importance there is: a ranking of one.
    return keep if choice and len(keep) > len(choice) else []


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# -- the (rho, m) heatmap ------------------------------------------------------------------------


def _bins(values: pd.Series) -> tuple[pd.Series, list[str]]:
    """Label each value with its bin; exact values where there are few, else MAX_BINS ranges
    (geometric where positive and spanning >= 10x, as rho and m usually are)."""
    finite = values[np.isfinite(values)]
    unique = np.sort(finite.unique())
    if len(unique) <= MAX_BINS:
        labels = [f"{v:.3g}" for v in unique]
        return values.map(lambda v: f"{v:.3g}" if np.isfinite(v) else None), labels
    low, high = float(unique[0]), float(unique[-1])
    if low > 0 and high / low >= 10:
        edges = np.geomspace(low, high, MAX_BINS + 1)
    else:
        edges = np.linspace(low, high, MAX_BINS + 1)
    labels = [f"{a:.2g}-{b:.2g}" for a, b in zip(edges[:-1], edges[1:])]
    binned = pd.cut(values, edges, labels=labels, include_lowest=True)
    return binned.astype(object).where(binned.notna(), None), labels


def _heatmap(sam: pd.DataFrame, cell: str, objective: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Lowest and mean `objective` per (rho bin, m bin) among `sam` trials, with trial counts;
    also the ordered bin labels of both axes. The columns keep the names `best_val_error` and
    `mean_val_error` whichever error the objective is; `objective` says which."""
    columns = [
        "cell",
        "rho_bin",
        "m_bin",
        "rho_index",
        "m_index",
        "best_val_error",
        "mean_val_error",
        "n_trials",
        "objective",
    ]
    if sam.empty or "rho" not in sam:
        return pd.DataFrame(columns=columns), [], []
    frame = pd.DataFrame(
        {
            "rho": pd.to_numeric(sam["rho"], errors="coerce"),
            "m": effective_m(sam),
            "val_error": pd.to_numeric(sam[objective], errors="coerce"),
        }
    )
    frame = frame[np.isfinite(frame["val_error"])]
    if frame.empty:
        return pd.DataFrame(columns=columns), [], []
    frame["rho_bin"], rho_labels = _bins(frame["rho"])
    frame["m_bin"], m_labels = _bins(frame["m"])
    rows = []
    for (rho_bin, m_bin), group in frame.groupby(["rho_bin", "m_bin"], sort=False):
        rows.append(
            {
                "cell": cell,
                "rho_bin": rho_bin,
                "m_bin": m_bin,
                "rho_index": rho_labels.index(rho_bin),
                "m_index": m_labels.index(m_bin),
                "best_val_error": float(group["val_error"].min()),
                "mean_val_error": float(group["val_error"].mean()),
                "n_trials": len(group),
                "objective": objective,
            }
        )
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values(["rho_index", "m_index"], ignore_index=True), rho_labels, m_labels


def _draw_heatmap(
    ax,
    heatmap: pd.DataFrame,
    rho_labels: list[str],
    m_labels: list[str],
    cell: str,
    trials: pd.DataFrame,
    objective: str,
) -> None:
    ax.set_title(f"{cell}: best {_label(objective)}, SAM, rho x m", fontsize="medium")
    if heatmap.empty:
        ax.text(0.5, 0.5, "no SAM trial in this cell", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    grid = np.full((len(rho_labels), len(m_labels)), np.nan)
    for _, r in heatmap.iterrows():
        grid[r["rho_index"], r["m_index"]] = r["best_val_error"]
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    low, high = np.nanmin(grid), np.nanmax(grid)
    for _, r in heatmap.iterrows():
        # Dark text on viridis' bright (high) end, white on its dark end.
        bright = high > low and (r["best_val_error"] - low) / (high - low) > 0.6
        ax.text(
            r["m_index"],
            r["rho_index"],
            f"{r['best_val_error']:.3f}\nn={r['n_trials']}",
            ha="center",
            va="center",
            fontsize=7,
            color="black" if bright else "white",
        )
    ax.set_xticks(range(len(m_labels)), m_labels, fontsize=7)
    ax.set_yticks(range(len(rho_labels)), rho_labels, fontsize=7)
    ax.set_xlabel("m (examples per perturbation)")
    ax.set_ylabel("rho")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    sgd = trials[trials["optimizer_label"] == "SGD"]
    if len(sgd):
        best_sgd = pd.to_numeric(sgd[objective], errors="coerce").min()
        ax.set_title(f"{cell}: best {_label(objective)}, SAM, rho x m (SGD best {best_sgd:.3f})", fontsize="medium")


# -- the learning-rate slice ---------------------------------------------------------------------


def _draw_slice(ax, slice_: pd.DataFrame, colors: dict[str, str], cell: str, objective: str) -> None:
    ax.set_title(f"{cell}: {_label(objective)} vs learning rate", fontsize="medium")
    shown = slice_[np.isfinite(slice_["lr"]) & np.isfinite(slice_["val_error"])]
    for label, group in shown.groupby("optimizer_label"):
        ax.scatter(group["lr"], group["val_error"], s=16, alpha=0.7, color=colors[label], label=label)
    if len(shown) and shown["lr"].min() > 0 and shown["lr"].max() / shown["lr"].min() >= 10:
        ax.set_xscale("log")
        # Over about one decade matplotlib labels the minor ticks too, and they overlap.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final {_label(objective)}")
    ax.grid(alpha=0.3)
    if len(shown):
        ax.legend(fontsize="small")


# -- importance ----------------------------------------------------------------------------------


def _distribution(values: list):
    """An Optuna distribution that covers `values`, and the values cast to fit it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if numeric:
        low, high = float(min(values)), float(max(values))
        log = low > 0 and high / low >= 10
        if all(float(v).is_integer() for v in values):
            return IntDistribution(int(low), int(high), log=log), [int(v) for v in values]
        return FloatDistribution(low, high, log=log), [float(v) for v in values]
    as_choices = [v if isinstance(v, (bool, str)) or v is None else str(v) for v in values]
    choices = sorted(set(as_choices), key=repr)
    return CategoricalDistribution(choices), as_choices


def _importance(
    runs: Runs,
    trials: pd.DataFrame,
    cell: str,
    objective: str = OBJECTIVE,
    *,
    params: list[str] | None = None,
    scope: str = "SAM family",
) -> tuple[pd.DataFrame, str | None]:
    """fANOVA and PED-ANOVA importances of `params` (default: the hyperparameters searched among
    `trials`) for `objective`, every one of `trials` entered as a completed Optuna trial (the
    caller passes only trials that ran their whole budget).

    Returns (frame with cell, scope, evaluator, param, importance, n_trials; a note when
    skipped)."""
    import optuna
    from optuna.importance import (
        FanovaImportanceEvaluator,
        PedAnovaImportanceEvaluator,
        get_param_importances,
    )

    empty = pd.DataFrame(columns=IMPORTANCE_COLUMNS)
    values = (
        pd.to_numeric(trials[objective], errors="coerce")
        if objective in trials
        else pd.Series(np.nan, index=trials.index)
    )
    trials = trials[np.isfinite(values)]
    # What defines a cell (its noise rate) varies only between cells, never within a study.
    searched = [p for p in searched_hyperparameters(runs, trials) if p not in STUDY_KEYS]
    params = searched if params is None else [p for p in params if p in searched]
    if not params:
        return empty, (f"{cell} ({scope}): no hyperparameter varies, so there is no importance to compute.")
    if len(trials) < MIN_TRIALS_FOR_IMPORTANCE:
        return empty, (
            f"{cell} ({scope}): importance needs at least "
            f"{MIN_TRIALS_FOR_IMPORTANCE} trials that ran their whole budget, "
            f"found {len(trials)} (more trials per cell: --set trials=N)."
        )
    columns_values = {}
    for name in params:
        values = list(effective_m(trials)) if name == "m" else list(trials[name])
        columns_values[name] = _distribution(values)
    distributions = {name: dist for name, (dist, _) in columns_values.items()}
    study_trials = []
    for i, value in enumerate(pd.to_numeric(trials[objective])):
        study_trials.append(
            optuna.trial.create_trial(
                params={name: cast[i] for name, (_, cast) in columns_values.items()},
                distributions=distributions,
                value=float(value),
            )
        )
    quantile = min(0.5, max(0.1, PED_ANOVA_TOP_TRIALS / len(study_trials)))
    evaluators = {
        "fANOVA": FanovaImportanceEvaluator(seed=0),
        "PED-ANOVA": PedAnovaImportanceEvaluator(target_quantile=quantile),
    }
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    try:
        study = optuna.create_study(direction="minimize")
        study.add_trials(study_trials)
        for name, evaluator in evaluators.items():
            with warnings.catch_warnings():
                # Few trials by design; the note on the page says so, the console need not.
                warnings.simplefilter("ignore")
                result = get_param_importances(study, evaluator=evaluator, params=params)
            rows += [
                {
                    "cell": cell,
                    "scope": scope,
                    "evaluator": name,
                    "param": p,
                    "importance": float(v),
                    "n_trials": len(study_trials),
                }
                for p, v in result.items()
            ]
    finally:
        optuna.logging.set_verbosity(verbosity)
    return pd.DataFrame(rows, columns=IMPORTANCE_COLUMNS), None


def _draw_importance(ax, importance: pd.DataFrame, cell: str, note: str | None, objective: str, scope: str) -> None:
    ax.set_title(f"{cell}: importance for {_label(objective)}, {scope}", fontsize="medium")
    if importance.empty:
        ax.text(
            0.5,
            0.5,
            note or "no importance",
            ha="center",
            va="center",
            wrap=True,
            transform=ax.transAxes,
            fontsize="small",
        )
        ax.set_axis_off()
        return
    table = importance.pivot(index="param", columns="evaluator", values="importance")
    table = table.loc[table.mean(axis=1).sort_values().index]
    y = np.arange(len(table))
    height = 0.8 / len(table.columns)
    for i, evaluator in enumerate(table.columns):
        ax.barh(y + i * height, table[evaluator], height=height, label=evaluator)
    ax.set_yticks(y + height * (len(table.columns) - 1) / 2, table.index)
    ax.set_xlabel("importance (sums to 1 per evaluator)")
    ax.legend(fontsize="small")


# -- the ablation curves -------------------------------------------------------------------------

#: The SAM paper's settings, marked on the curves: rho = 0.05, m the whole batch (None).
PAPER = PAPER_BASELINES[1]
CURVE_AXES = {
    "rho": "rho",
    "lr": "lr, as a multiple of the best SAM pick's",
    "sgd lr": "lr, as a multiple of the best SGD pick's",
    "m": "m (examples per perturbation; None = the whole per-worker batch)",
}


def _curves(runs: Runs) -> tuple[list[tuple[str, str, dict, str]], list[str]]:
    """Every ablation curve of the sweep's verdicts as (cell, curve, curve's dict, selection
    rule it is drawn under: the first, the final epoch), and a note where there are none."""
    found = verdicts(runs) if not runs.confirmations.empty else []
    curves = [(v["cell"], key, curve, v["rules"][0]) for v in found if v["rules"] for key, curve in v["curves"].items()]
    if curves:
        return curves, []
    why = "ran no ablations" if found else "ran no confirmation stage (confirm_seeds=0)"
    return [], [
        f"No ablation curves: this sweep {why}. Sweep(confirm_seeds=3, ablations={{'rho': None, 'lr': None, "
        "'m': None}}) adds, per setting and cell, a curve of the confirmed pick with that one setting "
        "moved, with 95% intervals over seeds and the range no worse than the optimum by more than the margin."
    ]


def _draw_curve(ax, cell: str, key: str, curve: dict, rule: str) -> None:
    """One curve: each point's mean with its 95% interval, the optimum starred, the robust range
    shaded and the paper's default (rho = 0.05, m = the whole batch) marked."""
    points = curve["points"]
    numeric = key != "m"
    x = [p["value"] for p in points] if numeric else list(range(len(points)))
    means = np.array([p[rule].mean for p in points])
    err = np.array([[p[rule].mean - p[rule].low for p in points], [p[rule].high - p[rule].mean for p in points]])
    ax.errorbar(x, means, yerr=np.nan_to_num(err), fmt="o-", capsize=4, color="C0", label="mean, 95% CI")
    at = next(i for i, p in enumerate(points) if p["optimum"])
    ax.plot([x[at]], [means[at]], marker="*", markersize=16, color="C3", linestyle="", label="optimum (the pick)")
    low, high = (x[[p["label"] for p in points].index(label)] for label in curve["robust_range"][rule])
    if numeric:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvspan(low / 1.1, high * 1.1, color="C2", alpha=0.15, label="robust range (the verdicts' rule)")
    else:
        ax.axvspan(low - 0.4, high + 0.4, color="C2", alpha=0.15, label="robust range (the verdicts' rule)")
        ax.set_xticks(x, [p["label"] for p in points])
    default = PAPER.get(curve["setting"], "none") if curve["of"] == "best_sam" else "none"
    if default != "none":
        where = default if numeric else next((i for i, p in enumerate(points) if p["value"] == default), None)
        if where is not None:
            ax.axvline(where, color="gray", linestyle="--", label=f"paper's default ({key}={default})")
    seeds = max(p[rule].n for p in points)
    ax.set_title(
        f"{cell}: {key} ablation, test error at the {RULES[rule]} ({seeds} seeds)",
        fontsize="medium",
    )
    ax.set_xlabel(CURVE_AXES[key])
    ax.set_ylabel("test error (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


def _curve_frame(curves: list[tuple[str, str, dict, str]]) -> pd.DataFrame:
    """The curves' points: value, estimate and paired difference from the optimum per rule."""
    rows = []
    for cell, key, curve, _ in curves:
        for rule in RULES:
            for p in curve["points"]:
                if rule not in p:
                    continue
                est, diff = p[rule], p[f"{rule} difference"]
                rows.append(
                    {
                        "cell": cell,
                        "curve": key,
                        "value": p["label"],
                        "optimum": p["optimum"],
                        "selection": RULES[rule],
                        "mean": est.mean,
                        "low": est.low,
                        "high": est.high,
                        "seeds": est.n,
                        "difference": diff.mean,
                        "difference_low": diff.low,
                        "difference_high": diff.high,
                        "difference_level": diff.level,
                        "decision": p[f"{rule} decision"].outcome,
                        "robust": p["label"] in curve["robust"][rule],
                    }
                )
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


CURVE_COLUMNS = [
    "cell",
    "curve",
    "value",
    "optimum",
    "selection",
    "mean",
    "low",
    "high",
    "seeds",
    "difference",
    "difference_low",
    "difference_high",
    "difference_level",
    "decision",
    "robust",
]

"""Sharpness: which sharpness measure predicts generalization here.

Each logged sharpness measure (its last measured value per trial) against final test error and
against the final generalization gap, one point per trial coloured by cell, with Kendall's tau
over all trials and per cell. Where trials vary one hyperparameter at a time, the granulated
tau of Jiang et al. 2019 ("Fantastic Generalization Measures and Where to Find Them",
arXiv 1912.02178, section 5) is given too: for each hyperparameter, the mean tau over groups of
trials that agree on every other searched hyperparameter (and cell), then the mean over
hyperparameters (their Psi). It discounts correlations that come only from one hyperparameter
moving both the measure and the error.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import kendalltau

from samtune.report.runs import Runs
from samtune.report.views import View
from samtune.report.table import cell_order, searched_hyperparameters

ORDER = 30

TARGETS = {"test error": "final_test_error", "generalization gap": "final_generalization_gap"}
# Kendall's tau on fewer points is mostly noise.
MIN_POINTS = 3
# A hyperparameter's granulated tau needs this many groups (each >= 2 trials differing in it).
MIN_GROUPS = 2


def view(runs: Runs) -> View:
    measures = runs.sharpness_measures
    plotted = runs.plotted
    if not measures:
        return View(figure=None, notes=[
            "No sharpness measure was logged (sharpness/<measure>); set sharpness_every or "
            "keep the end-of-training measurement on to fill this view."])
    targets = {name: col for name, col in TARGETS.items() if col in plotted}
    notes = [f"{col} was not logged; no {name} panel." for name, col in TARGETS.items()
             if col not in plotted]
    cells = cell_order(plotted)
    palette = {cell: f"C{i % 10}" for i, cell in enumerate(cells)}

    taus, granulated, overall = [], [], []
    groups = _controlled_groups(runs, plotted)
    figure = Figure(figsize=(6 * max(1, len(targets)), 4 * len(measures)), layout="constrained")
    axes = figure.subplots(len(measures), max(1, len(targets)), squeeze=False)
    for row, measure in zip(axes, measures):
        column = f"sharpness/{measure}"
        for ax, (target_name, target) in zip(row, targets.items()):
            frame = pd.DataFrame({
                "cell": plotted["cell"],
                "x": pd.to_numeric(plotted[column], errors="coerce"),
                "y": pd.to_numeric(plotted[target], errors="coerce"),
            })
            frame = frame[np.isfinite(frame["x"]) & np.isfinite(frame["y"])]
            pooled = _tau(frame["x"], frame["y"])
            taus.append({"measure": measure, "target": target_name, "cell": "all", **pooled})
            for cell in cells:
                part = frame[frame["cell"] == cell]
                stats = _tau(part["x"], part["y"])
                taus.append({"measure": measure, "target": target_name, "cell": cell, **stats})
                if len(part):
                    ax.scatter(part["x"], part["y"], s=14, alpha=0.7, color=palette[cell],
                               label=f"{cell} (tau {stats['tau']:.2f})")
            per_hp = _granulated(groups, plotted, column, target)
            for hp, (psi, n_groups) in per_hp.items():
                granulated.append({"measure": measure, "target": target_name,
                                   "hyperparameter": hp, "psi": psi, "n_groups": n_groups})
            if per_hp:
                overall.append({"measure": measure, "target": target_name,
                                "granulated_tau": float(np.mean([v[0] for v in per_hp.values()])),
                                "n_hyperparameters": len(per_hp)})
            x = frame["x"]
            if len(x) and x.min() > 0 and x.max() / x.min() >= 100:
                ax.set_xscale("log")
            title = f"{measure} vs {target_name}: tau {pooled['tau']:.2f} (n={pooled['n']})"
            if per_hp:
                title += f", granulated {overall[-1]['granulated_tau']:.2f}"
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel(measure)
            ax.set_ylabel(target_name)
            ax.grid(alpha=0.3)
            if len(frame):
                ax.legend(fontsize="x-small")
    if not granulated:
        notes.append("Granulated tau: no hyperparameter has at least "
                     f"{MIN_GROUPS} groups of trials that differ in it alone.")
    figure.suptitle(f"{runs.experiment}: sharpness against generalization")
    data = {
        "tau": pd.DataFrame(taus, columns=["measure", "target", "cell", "tau", "p_value", "n"]),
        "granulated": pd.DataFrame(
            granulated, columns=["measure", "target", "hyperparameter", "psi", "n_groups"]),
        "granulated_overall": pd.DataFrame(
            overall, columns=["measure", "target", "granulated_tau", "n_hyperparameters"]),
    }
    return View(figure=figure, data=data, notes=notes)


def _tau(x: pd.Series, y: pd.Series, min_points: int = MIN_POINTS) -> dict[str, float]:
    """Kendall's tau-b and its p-value; NaN below `min_points` or when either side is constant."""
    n = int(len(x))
    if n < min_points or x.nunique() < 2 or y.nunique() < 2:
        return {"tau": float("nan"), "p_value": float("nan"), "n": n}
    result = kendalltau(x, y)
    return {"tau": float(result.statistic), "p_value": float(result.pvalue), "n": n}


def _controlled_groups(runs: Runs, trials: pd.DataFrame) -> dict[str, list[np.ndarray]]:
    """Per searched hyperparameter h: groups (row positions in `trials`) of trials that share the
    cell and every other searched hyperparameter, and take at least two values of h. Seeds are
    not hyperparameters, so seed repeats fall in the same group."""
    hyperparameters = sorted({
        hp for cell in trials["cell"].unique()
        for hp in searched_hyperparameters(runs, trials[trials["cell"] == cell])
    })
    as_text = {hp: trials[hp].map(repr).to_numpy() for hp in hyperparameters}
    cells = trials["cell"].to_numpy()
    groups: dict[str, list[np.ndarray]] = {}
    for hp in hyperparameters:
        others = [as_text[h] for h in hyperparameters if h != hp]
        members: dict[tuple, list[int]] = {}
        for position, key in enumerate(zip(cells, *others)):
            members.setdefault(key, []).append(position)
        groups[hp] = [np.array(rows) for rows in members.values()
                      if len(set(as_text[hp][rows])) >= 2]
    return groups


def _granulated(groups: dict[str, list[np.ndarray]], trials: pd.DataFrame, measure: str,
                target: str) -> dict[str, tuple[float, int]]:
    """Jiang et al.'s psi_h per hyperparameter h: the mean, over `groups[h]`, of Kendall's tau
    between `measure` and `target` within the group. Non-finite values are dropped first; a group
    left with fewer than two values of h, or with an undefined tau, does not count; h needs
    MIN_GROUPS groups that count. Returns {h: (psi_h, groups counted)}."""
    x = pd.to_numeric(trials[measure], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(trials[target], errors="coerce").to_numpy(dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    result = {}
    for hp, hp_groups in groups.items():
        values = trials[hp].map(repr).to_numpy()
        group_taus = []
        for rows in hp_groups:
            rows = rows[finite[rows]]
            if len(set(values[rows])) < 2:
                continue
            # A controlled pair already says something (the sign agreement), so groups need
            # only two trials; the MIN_POINTS floor is for the uncontrolled, pooled numbers.
            tau = _tau(pd.Series(x[rows]), pd.Series(y[rows]), min_points=2)["tau"]
            if np.isfinite(tau):
                group_taus.append(tau)
        if len(group_taus) >= MIN_GROUPS:
            result[hp] = (float(np.mean(group_taus)), len(group_taus))
    return result

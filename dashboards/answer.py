"""The answer: does SAM beat SGD in each cell, by how much, and how sure is it?

Each cell's best SGD and best SAM configurations (and its SAM baseline at the SAM paper's
defaults) ran again on fresh seeds after the search. Per cell, the test error's mean over those
seeds with its 95% Student-t interval, under two selection rules: the final epoch (left) and the
epoch of lowest validation error, i.e. early stopping on the noisy validation set (right). The
table under the figure gives the SAM - SGD difference, paired by seed, and the verdict it
supports under the sweep's sequential design (SAM better, SGD better, equivalent within the
margin, or undecided at n seeds) with the interval that decided it. With an m ablation, the
last panel draws test error against m (the SAM paper's m-sharpness: smaller m, lower error?).
A finetuning cell also shows where its runs started: the pretrained backbone, frozen, with a
linear head fit to the cell's training labels (a dashed line; the same for every seed, since
neither the backbone nor the labels change with it).
A sweep without a confirmation stage (``confirm_seeds=0``) has only single searched runs: this
view then says so and draws nothing.

With human label noise cells (CIFAR-10N, CIFAR-100N) beside their synthetic twins, the
``human_vs_twin`` table and the notes give, per selection rule, SAM's gain over SGD under human
noise minus its gain under the twin (the same per-class transition matrix, on random images):
each seed's gain is best SGD's test error minus best SAM's, the two cells' gains are paired by
seed (the cells confirm on the same seeds), and the difference is their mean with a 95% Student-t
interval, in percentage points. Where a cell has no confirmation runs to pair, the row says why.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from samtune.report.answers import human_minus_twin, human_twin_table, verdicts
from samtune.report.runs import Runs
from samtune.report.table import optimizer_colors
from samtune.report.views import View
from samtune.verdicts import RULES, verdict_rows

ORDER = 0
SHOWN = (("best_sgd", "SGD (best)"), ("best_sam", "SAM (best)"), ("sam_baseline", "SAM (rho=0.05)"))


def _estimates(found: list[dict]) -> pd.DataFrame:
    rows = []
    for v in found:
        for name, label in SHOWN:
            for rule in v["rules"]:
                est = v["configs"].get(name, {}).get(rule)
                if est is not None and est.n:
                    rows.append(
                        {
                            "cell": v["cell"],
                            "config": name,
                            "label": label,
                            "selection": RULES[rule],
                            "mean": est.mean,
                            "low": est.low,
                            "high": est.high,
                            "seeds": est.n,
                        }
                    )
    return pd.DataFrame(rows, columns=["cell", "config", "label", "selection", "mean", "low", "high", "seeds"])


def _m_curve(found: list[dict]) -> pd.DataFrame:
    rows = [
        {
            "cell": v["cell"],
            "m": m,
            "selection": RULES[rule],
            "mean": est[rule].mean,
            "low": est[rule].low,
            "high": est[rule].high,
            "seeds": est[rule].n,
        }
        for v in found
        for m, est in v["m_curve"].items()
        for rule in v["rules"]
    ]
    return pd.DataFrame(rows, columns=["cell", "m", "selection", "mean", "low", "high", "seeds"])


def _panel(ax, estimates: pd.DataFrame, selection: str, cells: list[str], colors: dict) -> None:
    width = 0.8 / len(SHOWN)
    for i, (name, label) in enumerate(SHOWN):
        part = estimates[(estimates["config"] == name) & (estimates["selection"] == selection)]
        x = [cells.index(c) + (i - 1) * width for c in part["cell"]]
        err = np.array([part["mean"] - part["low"], part["high"] - part["mean"]])
        ax.errorbar(x, part["mean"], yerr=np.nan_to_num(err), fmt="o", capsize=4, label=label, color=colors[label])
    ax.set_xticks(range(len(cells)), cells)
    ax.set_title(f"test error at the {selection}", fontsize="medium")
    ax.set_ylabel("test error (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3)


def _starting_points(frame: pd.DataFrame) -> pd.Series:
    """Each finetuning cell's starting-point test error (mean over its runs, which agree)."""
    if "pretrained_test_error" not in frame:
        return pd.Series(dtype=float)
    return frame.dropna(subset=["pretrained_test_error"]).groupby("cell", sort=False)["pretrained_test_error"].mean()


def _draw_starting_points(ax, starts: pd.Series, cells: list[str]) -> None:
    for i, (cell, value) in enumerate(starts.items()):
        if cell in cells:
            # A line, not hlines: the legend's "best" place avoids lines only.
            ax.plot(
                [cells.index(cell) - 0.45, cells.index(cell) + 0.45],
                [value, value],
                color="gray",
                linestyle="--",
                label=None if i else "pretrained, head fit (no finetuning)",
            )


def _human_vs_twin(runs: Runs, found: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """The human-minus-twin table and its sentences (none without a human noise cell)."""
    rows = human_minus_twin(runs, found)
    notes = [
        f"Human minus twin, {row['human_cell']} (each cell's confirmed best SAM against its best SGD, "
        f"test error at the {RULES[row['rule']]}{' (early stopping)' if row['rule'] == 'best_epoch' else ''}): "
        f"{row['reading']}"
        for row in rows
    ]
    return human_twin_table(rows), notes


def view(runs: Runs) -> View:
    found = verdicts(runs)
    if not found:
        human_twin, twin_notes = _human_vs_twin(runs, found)
        return View(
            figure=None,
            data={"human_vs_twin": human_twin} if twin_notes else {},
            notes=[
                "This sweep ran no confirmation stage (confirm_seeds=0): every number "
                "in this report is a single run picked as the best of a search, with "
                "no error bar. Set confirm_seeds (e.g. 3) for verdicts with intervals."
            ]
            + twin_notes,
        )
    estimates, curve = _estimates(found), _m_curve(found)
    table = pd.DataFrame(verdict_rows(found))
    cells = list(dict.fromkeys(v["cell"] for v in found))
    selections = [RULES[r] for r in RULES if r in {rule for v in found for rule in v["rules"]}]
    # SGD and SAM in the colours every view gives them; the SAM baseline a lighter SAM.
    base = optimizer_colors(["SGD", "SAM"])
    colors = {"SGD (best)": base["SGD"], "SAM (best)": base["SAM"], "SAM (rho=0.05)": "#9ecae1"}
    panels = len(selections) + (not curve.empty)
    figure = Figure(figsize=(5.5 * panels, 4.2), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False).ravel()
    starts = _starting_points(runs.confirmations)
    for ax, selection in zip(axes, selections):
        _panel(ax, estimates, selection, cells, colors)
        _draw_starting_points(ax, starts, cells)
    axes[0].legend(fontsize="small")
    if not curve.empty:
        ax = axes[-1]
        for cell, part in curve[curve["selection"] == selections[0]].groupby("cell", sort=False):
            err = np.array([part["mean"] - part["low"], part["high"] - part["mean"]])
            ax.errorbar(
                part["m"].astype(str).replace("None", "None (whole batch)"),
                part["mean"],
                yerr=np.nan_to_num(err),
                fmt="o-",
                capsize=4,
                label=cell,
            )
        ax.set_title(f"best SAM configuration against m ({selections[0]})", fontsize="medium")
        ax.set_xlabel("m (examples per perturbation; None = the whole per-worker batch)")
        ax.set_ylabel("test error (mean, 95% CI over seeds)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    figure.suptitle(f"{runs.experiment}: SAM vs SGD on {int(estimates['seeds'].max())} fresh seeds")
    notes = [f"{r['cell']}, {r['selection']}: {r['verdict']}" for r in table.to_dict("records")]
    notes += [
        f"{cell}: the pretrained starting point (backbone frozen, a linear head fit to the cell's "
        f"training labels, before any finetuning step) has test error {value:.3f}"
        for cell, value in starts.items()
    ]
    human_twin, twin_notes = _human_vs_twin(runs, found)
    return View(
        figure=figure,
        data={
            "verdicts": table,
            "estimates": estimates,
            "m_curve": curve,
            "starting_points": starts.rename("test_error").reset_index(),
            **({"human_vs_twin": human_twin} if twin_notes else {}),
        },
        notes=notes + twin_notes,
    )

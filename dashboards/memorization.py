"""Memorization: fitting the noisy labels against the true ones, SAM against SGD, per noise cell.

Training accuracy on the noisy labels and on the true labels, by epoch. Per cell with a noise
rate above zero, for each optimizer the configuration chosen as in the robustness view (lowest
final validation error among trials that ran every epoch, seed repeats averaged; the sweep's
own picks where it recorded them, ties to the trial suggested first): solid,
accuracy on the labels it trained on (noisy); dashed, accuracy on the true labels. Once the
solid line climbs above 1 - noise rate while the dashed one falls, the model is fitting the
flipped labels; SAM's gain under label noise is resisting that (Foret et al. 2020, section 3.3).
Where trials logged no validation error (val_fraction=0) the choice is by final test error, and
a note says so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from samtune.report.runs import Runs
from samtune.report.table import best_per_optimizer, cell_order, choice_metric, optimizer_colors
from samtune.report.views import View

ORDER = 40

CURVES = ("train_acc_noisy", "train_acc_true")


def view(runs: Runs) -> View:
    plotted = runs.plotted
    history = runs.history
    missing = [c for c in CURVES if c not in history]
    if missing:
        return View(figure=None, notes=[f"{', '.join(missing)} not logged; nothing to show."])
    noisy_cells = [cell for cell in cell_order(plotted) if _noise_rate(plotted[plotted["cell"] == cell]) > 0]
    if not noisy_cells:
        return View(figure=None, notes=["No cell with a label-noise rate above zero."])

    notes = []
    curves = []
    for cell in noisy_cells:
        trials = plotted[plotted["cell"] == cell]
        pool = trials[trials["status"] == "finished"]
        if pool.empty:
            notes.append(f"{cell}: no trial ran every epoch; using early-stopped ones.")
            pool = trials
        chosen_by, note = choice_metric(pool, "final_val_error")
        if note:
            notes.append(f"{cell}: {note}")
        chosen = best_per_optimizer(pool, chosen_by, prefer=runs.picked)
        for _, choice in chosen.iterrows():
            run_ids = pool.loc[pool["config_key"] == choice["config_key"], "run_id"]
            epochs = history[history["run_id"].isin(run_ids)]
            mean = epochs.groupby("epoch")[list(CURVES)].mean().reset_index()
            mean.insert(0, "cell", cell)
            mean.insert(1, "optimizer_label", choice["optimizer_label"])
            mean["n_seeds"] = len(run_ids)
            mean["label_noise_rate"] = _noise_rate(trials)
            curves.append(mean)
    curves = (
        pd.concat(curves, ignore_index=True)
        if curves
        else pd.DataFrame(columns=["cell", "optimizer_label", "epoch", *CURVES, "n_seeds", "label_noise_rate"])
    )

    colors = optimizer_colors(curves["optimizer_label"])
    columns = min(3, len(noisy_cells))
    rows = int(np.ceil(len(noisy_cells) / columns))
    figure = Figure(figsize=(5.5 * columns, 4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, cell in zip(axes, noisy_cells):
        part = curves[curves["cell"] == cell]
        for label, group in part.groupby("optimizer_label"):
            ax.plot(group["epoch"], group["train_acc_noisy"], color=colors[label], label=f"{label}: noisy labels")
            ax.plot(
                group["epoch"], group["train_acc_true"], color=colors[label], ls="--", label=f"{label}: true labels"
            )
        rate = _noise_rate(plotted[plotted["cell"] == cell])
        ax.axhline(1 - rate, color="#999999", lw=0.8, ls=":", label="1 - noise rate")
        ax.set_title(cell, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(noisy_cells) :]:
        ax.set_axis_off()
    figure.suptitle(f"{runs.experiment}: fitting the noisy labels vs the true ones")
    return View(figure=figure, data={"curves": curves}, notes=notes)


def _noise_rate(trials: pd.DataFrame) -> float:
    if "label_noise_rate" not in trials or trials.empty:
        return 0.0
    rate = pd.to_numeric(trials["label_noise_rate"], errors="coerce").iloc[0]
    return float(rate) if np.isfinite(rate) else 0.0

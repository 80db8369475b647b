"""Robustness: test error against the label-noise rate, best SAM against best SGD per cell.

Per cell and optimizer, the configuration with the lowest validation error (averaged over seed
repeats) is drawn as a line, with +-1 standard deviation over seeds as error bars where seeds
repeat; every trial is a faint point behind. Left: test error at the final epoch (trials that ran
to the end, chosen by final validation error). Right: test error at the epoch of lowest
validation error (early stopping, chosen by that validation error) - under label noise SAM's gain
is known to depend on early stopping. That panel also weighs trials ASHA stopped; where its choice
is a configuration no trial of which ran the whole budget, the point is hollow and a note says how
many epochs it ran.

The final-epoch panel draws the sweep's own picks, the configurations its confirmation stage
ran again (recorded on each cell's run); for a sweep without them, and in the best-epoch panel,
a tie goes to the configuration the search suggested first, the rule the sweep picks by. Every
line is the search's runs (one seed each): the notes set each gain beside the confirmed verdict.

Choosing by validation error, not test error, keeps the comparison honest: the test set only
reports. Where trials logged no validation error (trained with val_fraction=0), a panel chooses by
test error instead and a note under the figure says so. The x axis is what the cells vary: the
label-noise rate (of the finetuning target, in a finetuning sweep) where every cell has its own,
else the cells in order. A finetuning sweep also draws each cell's starting point (gray, dashed):
the pretrained backbone, frozen, with a linear head fit to the cell's training labels, before any
finetuning step (`pretrained_test_error`), so the finetuned errors read against where they began.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from samtune.report.answers import human_minus_twin, verdicts
from samtune.report.runs import Runs
from samtune.report.table import (
    best_per_optimizer,
    cell_order,
    choice_metric,
    optimizer_colors,
)
from samtune.report.views import View
from samtune.verdicts import RULES, verdict_rows

ORDER = 10

# (panel, chosen by, reported). The "final" panel keeps only trials that ran every epoch, so an
# early-stopped trial's short run never stands in for a full one.
PANELS = (
    ("final", "final_val_error", "final_test_error"),
    ("best", "best_val_error", "best_test_error"),
)


def _x_positions(trials: pd.DataFrame, cells: list[str]) -> tuple[dict[str, float], bool]:
    """Noise rate as x when every cell has its own rate (a label-noise sweep, or a finetuning one
    whose cells are noise rates of the target); else 0, 1, 2..."""
    rates = {}
    for cell in cells:
        first = trials[trials["cell"] == cell].iloc[0]
        rates[cell] = float(first.get("label_noise_rate", 0.0) or 0.0)
    if len(set(rates.values())) == len(cells):
        return rates, True
    return {cell: float(i) for i, cell in enumerate(cells)}, False


def _starting_points(trials: pd.DataFrame, x_of: dict[str, float]) -> pd.DataFrame:
    """Each finetuning cell's starting-point test error (mean and spread over its trials) at its x."""
    if "final_pretrained_test_error" not in trials:
        return pd.DataFrame(columns=["cell", "x", "test_error", "test_error_std"])
    start = trials.dropna(subset=["final_pretrained_test_error"]).groupby("cell", sort=False)
    out = start["final_pretrained_test_error"].agg(["mean", "std"]).reset_index()
    out = out.rename(columns={"mean": "test_error", "std": "test_error_std"})
    out.insert(1, "x", out["cell"].map(x_of))
    return out.sort_values("x")


def _draw_starting_points(ax, starts: pd.DataFrame) -> None:
    if not starts.empty:
        ax.plot(
            starts["x"],
            starts["test_error"],
            color="gray",
            linestyle="--",
            marker="x",
            label="pretrained, head fit (no finetuning)",
        )


def view(runs: Runs) -> View:
    plotted = runs.plotted
    cells = cell_order(plotted)
    x_of, numeric = _x_positions(plotted, cells)
    labels = sorted(plotted["optimizer_label"].unique())
    colors = optimizer_colors(labels)
    notes = []

    found = verdicts(runs)
    answers = {(row["cell"], row["selection"]): row["verdict"] for row in verdict_rows(found)}
    best_frames = []
    for panel, select_by, reported in PANELS:
        pool = plotted[plotted["status"] == "finished"] if panel == "final" else plotted
        chosen_by, note = choice_metric(pool, select_by)
        if note:
            notes.append(f"{'Final' if panel == 'final' else 'Best'}-epoch panel: {note}")
        # The final-epoch panel draws the sweep's own picks (those the confirmation stage ran again).
        best = best_per_optimizer(pool, chosen_by, report=[reported], prefer=runs.picked if panel == "final" else ())
        best.insert(0, "epoch", panel)
        # The validation error the choice was made by; NaN where the test error made it.
        chosen = best.pop(chosen_by)
        best = best.rename(columns={f"{reported}_mean": "test_error", f"{reported}_std": "test_error_std"})
        best["val_error"] = chosen if chosen_by == select_by else np.nan
        best["chosen_by"] = chosen_by
        best_frames.append(best)
    best = pd.concat(best_frames, ignore_index=True)
    best["x"] = best["cell"].map(x_of)
    best = _with_hyperparameters(best, plotted)
    best = _with_stopped_early(best, plotted)
    for row in best[best["stopped_early"]].itertuples():
        notes.append(
            f"Best-epoch panel, {row.cell}: the best {row.optimizer_label} configuration "
            f"ran {int(row.epochs_run)} epoch(s) only (ASHA stopped it); drawn hollow. "
            "No trial of it ran the whole budget."
        )

    points = plotted.reindex(
        columns=[
            "cell",
            "trial_key",
            "optimizer_label",
            "status",
            "final_val_error",
            "final_test_error",
            "best_val_error",
            "best_test_error",
        ]
    )
    points["x"] = points["cell"].map(x_of)

    gain = _gain_over_sgd(best)
    gain["verdict"] = [_verdict_of(answers, row.cell, row.epoch) for row in gain.itertuples()]
    notes.extend(_single_run_notes(gain, answers))
    # A human noise cell and its twin stand side by side here; whether SAM's gain differs
    # between them is a question for the confirmation seeds, paired (the answer view's table).
    notes.extend(
        f"Human minus twin, confirmed, {row['human_cell']} (test error at the {RULES[row['rule']]}): {row['reading']}"
        for row in human_minus_twin(runs, found)
    )
    if "SGD" not in labels:
        notes.append("No SGD trial: the gain table needs an SGD baseline in the cell.")
    missing = [c for c in cells if c not in set(best.loc[best["epoch"] == "final", "cell"])]
    if missing:
        notes.append(
            "No trial ran to the final epoch in: " + ", ".join(missing) + " (only the best-epoch panel has them)."
        )

    starts = _starting_points(plotted, x_of)
    for row in starts.itertuples():
        notes.append(
            f"{row.cell}: the pretrained starting point (backbone frozen, a linear head fit "
            f"to the cell's training labels, before any finetuning step) has test error "
            f"{row.test_error:.3f}"
        )

    figure = Figure(figsize=(13, 4.8), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    span = (max(x_of.values()) - min(x_of.values())) if len(x_of) > 1 else 1.0
    offsets = {label: (i - (len(labels) - 1) / 2) * 0.012 * span for i, label in enumerate(labels)}
    for ax, (panel, _, reported) in zip(axes, PANELS):
        for label in labels:
            faint = points[points["optimizer_label"] == label]
            ax.scatter(
                faint["x"] + offsets[label], faint[reported], s=12, alpha=0.18, color=colors[label], linewidths=0
            )
            chosen = best[(best["epoch"] == panel) & (best["optimizer_label"] == label)]
            chosen = chosen.sort_values("x")
            if chosen.empty:
                continue
            ax.errorbar(
                chosen["x"] + offsets[label],
                chosen["test_error"],
                yerr=chosen["test_error_std"].fillna(0.0),
                color=colors[label],
                marker="o",
                capsize=3,
                label=f"best {label}",
            )
            short = chosen[chosen["stopped_early"]]
            ax.scatter(
                short["x"] + offsets[label],
                short["test_error"],
                s=40,
                zorder=3,
                facecolors="white",
                edgecolors=colors[label],
                linewidths=1.5,
            )
        _draw_starting_points(ax, starts)
        ax.set_title("final epoch" if panel == "final" else "best epoch (early stopping)")
        ax.set_xlabel(
            ("label-noise rate of the target" if not starts.empty else "label-noise rate") if numeric else "cell"
        )
        if not numeric:
            ax.set_xticks(list(x_of.values()), list(x_of.keys()), rotation=20)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test error")
    axes[0].legend(loc="best", fontsize="small")
    if best["stopped_early"].any():
        axes[1].scatter(
            [], [], s=40, facecolors="white", edgecolors="gray", linewidths=1.5, label="choice ASHA stopped early"
        )
        axes[1].legend(loc="best", fontsize="small")
    figure.suptitle(f"{runs.experiment}: test error, best configuration per optimizer")
    return View(
        figure=figure, data={"best": best, "gain": gain, "trials": points, "starting_points": starts}, notes=notes
    )


def _with_hyperparameters(best: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Add the chosen configuration's lr, rho and m, so the table says what won."""
    first = trials.drop_duplicates("config_key").set_index("config_key")
    for key in ("lr", "rho", "m"):
        if key in first:
            best[key] = best["config_key"].map(first[key])
    return best


def _with_stopped_early(best: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Add whether no trial of the chosen configuration ran the whole budget (only the
    best-epoch panel can choose such a one) and the most epochs one of its trials ran: a
    4-epoch trial next to 16-epoch ones must not read as a like-for-like point."""
    runs = trials.groupby(["cell", "config_key"])
    finished = runs["status"].agg(lambda s: bool((s == "finished").any()))
    epochs = runs["epochs_run"].max()
    keys = list(zip(best["cell"], best["config_key"]))
    best["stopped_early"] = pd.Series([not finished.get(k, True) for k in keys], index=best.index, dtype=bool)
    best["epochs_run"] = pd.Series([float(epochs.get(k, np.nan)) for k in keys], index=best.index, dtype=float)
    return best


def _gain_over_sgd(best: pd.DataFrame) -> pd.DataFrame:
    """Test error of best SGD minus that of each other optimizer's best, per cell and panel:
    positive means the other optimizer helps."""
    rows = []
    for (panel, cell), group in best.groupby(["epoch", "cell"], sort=False):
        sgd = group[group["optimizer_label"] == "SGD"]
        if sgd.empty:
            continue
        baseline = float(sgd["test_error"].iloc[0])
        for _, row in group[group["optimizer_label"] != "SGD"].iterrows():
            rows.append(
                {
                    "epoch": panel,
                    "cell": cell,
                    "optimizer_label": row["optimizer_label"],
                    "sgd_test_error": baseline,
                    "test_error": row["test_error"],
                    "gain": baseline - row["test_error"],
                }
            )
    return pd.DataFrame(rows, columns=["epoch", "cell", "optimizer_label", "sgd_test_error", "test_error", "gain"])


def _verdict_of(answers: dict[tuple[str, str], str], cell: str, panel: str) -> str:
    """The confirmed verdict of `cell` under the panel's selection rule ('' without one)."""
    return answers.get((cell, RULES["final" if panel == "final" else "best_epoch"]), "")


def _single_run_notes(gain: pd.DataFrame, answers: dict[tuple[str, str], str]) -> list[str]:
    """What the lines are (single runs of the search) and, where the confirmation stage ran,
    the answer beside each gain they show, so a gain of one seed never reads as the verdict."""
    notes = [
        "Lines and gains are the search's runs (one seed each, no interval): they show where SAM and SGD "
        "stand, not whether the difference holds. "
        + (
            "The answer is the confirmed verdict, on fresh seeds with an interval (the answer view)."
            if answers
            else "This sweep confirmed nothing on fresh seeds (confirm_seeds=0): no verdict can be read here."
        )
    ]
    for row in gain.itertuples():
        if row.verdict and row.optimizer_label != "SGD":
            notes.append(
                f"{'Final' if row.epoch == 'final' else 'Best'}-epoch panel, {row.cell}: single runs differ by "
                f"{row.test_error - row.sgd_test_error:+.3f} ({row.optimizer_label} - SGD); confirmed: {row.verdict}"
            )
    return notes

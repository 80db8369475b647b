"""Claims: which of the SAM paper's claims hold in this sweep.

One row per claim of Foret et al. 2020 (arXiv 2010.01412) that the sweep's runs can test, and per
cell where the claim is per cell: the claim, the paper's figure or table, what is compared, the
measured value with its 95% interval, and a verdict by the cells' decision rule (holds / does not
hold where the interval decides, undecided at n seeds, cells or trials where it does not); a
claim the sweep has no runs for is listed as not tested, with what would test it. Test errors
come from the confirmation runs (fresh seeds, paired by seed); the Hessian's lambda_max and
lambda_max / lambda_5 from the search trials the sweep picked (one run per configuration and
cell: the cells are the replicates); Kendall's tau per m from the search trials that logged
m-sharpness at several m. The figure draws tau against m with its bootstrap interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from samtune.report.claims import claims, tau_per_m
from samtune.report.runs import Runs
from samtune.report.views import View

ORDER = 5
DENSITY_NOTE = (
    "The Hessian's spectral density of the confirmed SGD and SAM (samtune.sharpness.density."
    "spectral_density) is not drawn: it needs the confirmation runs' final weights, which the sweep "
    "does not keep; train a pick again with `samtune train --save-weights` and measure that."
)


def _verdict_table(ax, table: pd.DataFrame) -> None:
    """Each claim with its verdict, coloured by it (the measured values are in the table below)."""
    ax.axis("off")
    colors = {"holds": "#c7e9c0", "does not hold": "#fcbba1", "not tested": "#eeeeee"}
    cells = [[r["claim"], r["verdict"]] for r in table.to_dict("records")]
    shade = [["white", colors.get(r["verdict"], "#fff7bc")] for r in table.to_dict("records")]
    drawn = ax.table(
        cellText=cells, cellColours=shade, colLabels=["claim", "verdict"], loc="upper left", cellLoc="left"
    )
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8)
    drawn.auto_set_column_width([0, 1])


def _tau_panel(ax, tau_frame: pd.DataFrame) -> None:
    err = np.array([tau_frame["tau"] - tau_frame["low"], tau_frame["high"] - tau_frame["tau"]])
    ax.errorbar(tau_frame["m"].astype(str), tau_frame["tau"], yerr=np.nan_to_num(err), fmt="o-", capsize=4)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("m (examples per m-sharpness batch)")
    ax.set_ylabel("Kendall tau with the generalization gap (95% bootstrap CI)")
    ax.set_title(f"m-sharpness against the generalization gap, {int(tau_frame['n'].max())} trials", fontsize="medium")
    ax.grid(alpha=0.3)


def view(runs: Runs) -> View:
    table = claims(runs)
    taus = tau_per_m(runs.plotted)
    tau_frame = pd.DataFrame(
        [{"m": m, "tau": t.tau, "low": t.low, "high": t.high, "n": t.n, "text": t.text()} for m, t in taus.items()],
        columns=["m", "tau", "low", "high", "n", "text"],
    )
    panels = 1 + (not tau_frame.empty)
    figure = Figure(figsize=(7.5 + 5.5 * (panels - 1), 0.8 + 0.32 * len(table)), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False, width_ratios=[7.5, 5.5][:panels]).ravel()
    _verdict_table(axes[0], table)
    if not tau_frame.empty:
        _tau_panel(axes[1], tau_frame)
    figure.suptitle(f"{runs.experiment}: the SAM paper's claims")
    notes = [f"{r['claim']}: {r['verdict']} ({r['measured']})" for r in table.to_dict("records")]
    return View(figure=figure, data={"claims": table, "tau_per_m": tau_frame}, notes=[*notes, DENSITY_NOTE])

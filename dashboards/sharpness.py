"""Sharpness: which sharpness measure predicts generalization here.

Every Kendall tau is given with a 95% percentile bootstrap interval over trials (2000 resamples
of the trials with replacement, each trial's measure and error drawn together), as
"tau = 0.31 [0.05, 0.52] (n = 30)"; where the interval covers 0 the tau is "not distinguishable
from 0", and below 5 trials no interval is given. Sharpness often correlates weakly or even
negatively with generalization (Andriushchenko et al. 2023, "A Modern Look at the Relationship
between Sharpness and Generalization", arXiv 2302.07011): a tau here describes these trials only.

Each logged sharpness measure (its last measured value per trial) against final test error and
against the final generalization gap, one point per trial coloured by cell, with Kendall's tau
over all trials and per cell. Where trials vary one hyperparameter at a time, the granulated
tau of Jiang et al. 2019 ("Fantastic Generalization Measures and Where to Find Them",
arXiv 1912.02178, section 5) is given too: for each hyperparameter, the mean tau over groups of
trials that agree on every other searched hyperparameter (and cell), then the mean over
hyperparameters (their Psi). It discounts correlations that come only from one hyperparameter
moving both the measure and the error. Its interval resamples the trials of those groups and
recomputes every group's tau. Trial keys that only say how sharpness was measured
(sharpness_*) never count as a hyperparameter varied; they still tell groups apart. Only
`sharpness/<measure>` columns are measures: what a measurement logs beside a value
(`sharpness/<measure>/<setting>`, its cost or error estimate) is not plotted.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from samtune.contract.keys import TRIAL_KEYS
from samtune.report.runs import Runs
from samtune.report.table import cell_order, searched_hyperparameters
from samtune.report.views import View
from samtune.stats import (
    GranulatedTau,
    TauInterval,
    granulated_tau_interval,
    kendall_tau_interval,
)

ORDER = 30

TARGETS = {"test error": "final_test_error", "generalization gap": "final_generalization_gap"}
# Kendall's tau on fewer points is mostly noise.
MIN_POINTS = 3
# A hyperparameter's granulated tau needs this many groups (each >= 2 trials differing in it).
MIN_GROUPS = 2
# Settings of the measurement, not of training: trials that differ in them trained alike.
MEASUREMENT_KEYS = frozenset(key for key in TRIAL_KEYS if key.startswith("sharpness_"))

TAU_COLUMNS = ["measure", "target", "cell", "tau", "low", "high", "n", "text"]
GRANULATED_COLUMNS = ["measure", "target", "hyperparameter", "psi", "low", "high", "n_groups", "n", "text"]
OVERALL_COLUMNS = ["measure", "target", "granulated_tau", "low", "high", "n_hyperparameters", "n", "text"]


def view(runs: Runs) -> View:
    measures = runs.sharpness_measures
    plotted = runs.plotted
    if not measures:
        return View(
            figure=None,
            notes=[
                "No sharpness measure was logged (sharpness/<measure>); set sharpness_every or "
                "keep the end-of-training measurement on to fill this view."
            ],
        )
    targets = {name: col for name, col in TARGETS.items() if col in plotted}
    notes = [f"{col} was not logged; no {name} panel." for name, col in TARGETS.items() if col not in plotted]
    cells = cell_order(plotted)
    palette = {cell: f"C{i % 10}" for i, cell in enumerate(cells)}
    groups, levels = _controlled_groups(runs, plotted)

    rows: dict[str, list[dict]] = {"tau": [], "granulated": [], "granulated_overall": []}
    figure = Figure(figsize=(6 * max(1, len(targets)), 4 * len(measures)), layout="constrained")
    axes = figure.subplots(len(measures), max(1, len(targets)), squeeze=False)
    for row, measure in zip(axes, measures):
        for ax, (target_name, target) in zip(row, targets.items()):
            key = {"measure": measure, "target": target_name}
            x = pd.to_numeric(plotted[f"sharpness/{measure}"], errors="coerce").to_numpy(float)
            y = pd.to_numeric(plotted[target], errors="coerce").to_numpy(float)
            by_cell = {"all": _tau(x, y)}
            by_cell.update({cell: _tau(x[plotted["cell"] == cell], y[plotted["cell"] == cell]) for cell in cells})
            rows["tau"] += [{**key, "cell": cell, **_columns(est)} for cell, est in by_cell.items()]
            granulated = granulated_tau_interval(x, y, groups, levels, min_groups=MIN_GROUPS)
            _granulated_rows(rows, key, granulated)
            _draw(ax, plotted["cell"].to_numpy(), x, y, (measure, target_name), palette, by_cell, granulated)
            notes.append(_summary(measure, target_name, by_cell, granulated))
    notes += _caveats(rows)
    figure.suptitle(f"{runs.experiment}: sharpness against generalization")
    data = {
        "tau": pd.DataFrame(rows["tau"], columns=TAU_COLUMNS),
        "granulated": pd.DataFrame(rows["granulated"], columns=GRANULATED_COLUMNS),
        "granulated_overall": pd.DataFrame(rows["granulated_overall"], columns=OVERALL_COLUMNS),
    }
    return View(figure=figure, data=data, notes=notes)


def _tau(x: np.ndarray, y: np.ndarray) -> TauInterval:
    """Kendall's tau-b with its bootstrap interval; NaN below MIN_POINTS finite pairs."""
    est = kendall_tau_interval(x, y)
    if est.n < MIN_POINTS:
        return TauInterval(math.nan, math.nan, math.nan, est.n, est.level)
    return est


def _columns(est: TauInterval) -> dict:
    return {"tau": est.tau, "low": est.low, "high": est.high, "n": est.n, "text": est.text()}


def _granulated_rows(rows: dict[str, list[dict]], key: dict, granulated: GranulatedTau) -> None:
    """The granulated tau's rows: one per hyperparameter with enough groups, and the overall
    one where there is any."""
    for hp, est in granulated.by_hyperparameter.items():
        rows["granulated"].append(
            {
                **key,
                "hyperparameter": hp,
                "psi": est.tau,
                "low": est.low,
                "high": est.high,
                "n_groups": granulated.groups[hp],
                "n": est.n,
                "text": est.text(),
            }
        )
    if granulated.by_hyperparameter:
        overall = granulated.overall
        rows["granulated_overall"].append(
            {
                **key,
                "granulated_tau": overall.tau,
                "low": overall.low,
                "high": overall.high,
                "n_hyperparameters": len(granulated.by_hyperparameter),
                "n": overall.n,
                "text": overall.text(),
            }
        )


def _draw(
    ax,
    cells: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    names: tuple[str, str],
    palette: dict[str, str],
    by_cell: dict[str, TauInterval],
    granulated: GranulatedTau,
) -> None:
    """One panel: the trials coloured by cell, each cell's tau in the legend, the pooled and
    granulated taus in the title."""
    measure, target_name = names
    finite = np.isfinite(x) & np.isfinite(y)
    for cell, colour in palette.items():
        part = finite & (cells == cell)
        if part.any():
            ax.scatter(x[part], y[part], s=14, alpha=0.7, color=colour, label=f"{cell}: {by_cell[cell].text()}")
    shown = x[finite]
    if len(shown) and shown.min() > 0 and shown.max() / shown.min() >= 100:
        ax.set_xscale("log")
    title = f"{measure} vs {target_name}\n{by_cell['all'].text()}"
    if granulated.by_hyperparameter:
        title += f"\ngranulated {granulated.overall.text()}"
    ax.set_title(title, fontsize="small")
    ax.set_xlabel(measure)
    ax.set_ylabel(target_name)
    ax.grid(alpha=0.3)
    if finite.any():
        ax.legend(fontsize="x-small")


def _summary(measure: str, target_name: str, by_cell: dict[str, TauInterval], granulated: GranulatedTau) -> str:
    """One sentence per panel: the pooled tau, each cell's, each hyperparameter's psi and the
    granulated tau, with their intervals."""
    parts = [f"{measure} vs {target_name}: all trials: {by_cell['all'].text()}"]
    parts += [f"{cell}: {est.text()}" for cell, est in by_cell.items() if cell != "all"]
    if granulated.by_hyperparameter:
        parts += [f"psi({hp}): {est.text()}" for hp, est in granulated.by_hyperparameter.items()]
        parts.append(f"granulated: {granulated.overall.text()}")
    return "; ".join(parts) + "."


def _caveats(rows: dict[str, list[dict]]) -> list[str]:
    """What the taus as a whole do not show."""
    notes = []
    if not rows["granulated"]:
        notes.append(
            f"Granulated tau: no hyperparameter has at least {MIN_GROUPS} groups of trials that differ in it alone."
        )
    told = [
        r
        for r in rows["tau"] + rows["granulated_overall"]
        if math.isfinite(r["low"]) and not r["low"] <= 0.0 <= r["high"]
    ]
    if not told:
        notes.append(
            "No tau here is distinguishable from 0: these trials do not show any "
            "sharpness measure ranking them by generalization."
        )
    if any(r["low"] == r["high"] for r in told):
        notes.append(
            "A zero-width interval comes from a ranking every trial agrees with: no "
            "resample of these trials can contradict it, which says nothing of other "
            "trials."
        )
    return notes


def _controlled_groups(runs: Runs, trials: pd.DataFrame) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Per searched hyperparameter h: groups (row positions in `trials`) of trials that share the
    cell and every other searched setting, and take at least two values of h; and each trial's
    value of h. Seeds are not hyperparameters, so seed repeats fall in the same group; settings
    of the measurement split groups but are never h."""
    searched = sorted(
        {
            hp
            for cell in trials["cell"].unique()
            for hp in searched_hyperparameters(runs, trials[trials["cell"] == cell])
        }
    )
    as_text = {hp: trials[hp].map(repr).to_numpy() for hp in searched}
    cells = trials["cell"].to_numpy()
    groups: dict[str, list[np.ndarray]] = {}
    for hp in (h for h in searched if h not in MEASUREMENT_KEYS):
        others = [as_text[h] for h in searched if h != hp]
        members: dict[tuple, list[int]] = {}
        for position, key in enumerate(zip(cells, *others)):
            members.setdefault(key, []).append(position)
        groups[hp] = [np.array(rows) for rows in members.values() if len(set(as_text[hp][rows])) >= 2]
    return groups, {hp: as_text[hp] for hp in groups}

"""Claims: which of the SAM paper's claims hold in this sweep.

One row per claim of Foret et al. 2020 (arXiv 2010.01412) that the sweep's runs can test, and per
cell where the claim is per cell: the claim, the paper's figure or table, what is compared, the
measured value with its 95% interval, and a verdict by the cells' decision rule (holds / does not
hold where the interval decides, undecided at n seeds, cells or trials where it does not); a
claim the sweep has no runs for is listed as not tested, with what would test it. Test errors
come from the confirmation runs (fresh seeds, paired by seed); the Hessian's lambda_max and
lambda_max / lambda_5 from the search trials the sweep picked (one run per configuration and
cell: the cells are the replicates); Kendall's tau per m from the search trials that logged
m-sharpness at several m. The figure draws tau against m with its bootstrap interval and, where
the sweep measured it (`samtune.sweep.spectra`: once, after its confirmation stage, in one cell),
the Hessian's eigenvalue density of that cell's best SGD and best SAM (stochastic Lanczos
quadrature, on a log density axis as PyHessian draws it), read from the cell run's
``spectral_density.json``; nothing is computed here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from samtune.report.claims import claims, tau_per_m
from samtune.report.runs import Runs
from samtune.report.views import View

ORDER = 5
NO_DENSITY = (
    "The Hessian's spectral density is not drawn: this sweep logged none (the sweep measures it "
    "once, after its confirmation stage, from one cell's best SGD and best SAM weights; a sweep "
    "from before that, or one whose search picked no SGD and SAM trial with weights, has none)."
)
LABELS = {"best_sgd": ("SGD", "C0"), "best_sam": ("SAM", "C3")}


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


def _density_panel(ax, spectrum: dict) -> None:
    """The picks' eigenvalue densities on one grid, log density (PyHessian's 1e-7 floor)."""
    grid = np.asarray(spectrum["grid"], dtype=float)
    for name, (label, color) in LABELS.items():
        if name in spectrum["density"]:
            pick = spectrum.get("picks", {}).get(name, {})
            shown = ", ".join(f"{k} {v:g}" for k, v in pick.items() if k in ("lr", "rho") and isinstance(v, float))
            density = np.asarray(spectrum["density"][name], dtype=float)
            ax.semilogy(grid, density + 1e-7, color=color, label=f"best {label} ({shown})" if shown else label)
    s = spectrum.get("settings", {})
    probes = s.get("probes")
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (log scale)")
    ax.set_title(
        f"{spectrum.get('cell', '')}: Hessian eigenvalue density, SLQ ({probes} probe{'' if probes == 1 else 's'} x "
        f"{s.get('steps')} steps, {s.get('subset')} training examples)",
        fontsize="medium",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def density_frame(spectra: dict[str, dict]) -> pd.DataFrame:
    """Per cell and pick, what its density says in numbers: the quadrature's largest and smallest
    node (lambda_max and lambda_min, to the Lanczos accuracy), its first moment (trace / n) and
    the mass of negative eigenvalues, averaged over the probes; the full grid is the artifact."""
    rows = []
    for cell, spectrum in spectra.items():
        for name, nodes in spectrum.get("nodes", {}).items():
            theta = np.asarray(nodes, dtype=float)
            w = np.asarray(spectrum["weights"][name], dtype=float)
            held = w > 1e-12
            rows.append(
                {
                    "cell": cell,
                    "pick": name,
                    "lambda_max": float(theta[held].max()),
                    "lambda_min": float(theta[held].min()),
                    "trace / n": float((w * theta).sum(1).mean()),
                    "negative mass": float((w * (theta < 0)).sum(1).mean()),
                    "parameters": spectrum.get("num_params", {}).get(name),
                    "seconds": spectrum.get("seconds", {}).get(name),
                }
            )
    return pd.DataFrame(rows, columns=DENSITY_COLUMNS)


DENSITY_COLUMNS = ["cell", "pick", "lambda_max", "lambda_min", "trace / n", "negative mass", "parameters", "seconds"]


def view(runs: Runs) -> View:
    table = claims(runs)
    taus = tau_per_m(runs.plotted)
    tau_frame = pd.DataFrame(
        [{"m": m, "tau": t.tau, "low": t.low, "high": t.high, "n": t.n, "text": t.text()} for m, t in taus.items()],
        columns=["m", "tau", "low", "high", "n", "text"],
    )
    spectra = runs.spectra
    widths = [7.5] + [5.5] * (not tau_frame.empty) + [6.5] * len(spectra)
    figure = Figure(figsize=(sum(widths), max(4.5, 0.8 + 0.32 * len(table))), layout="constrained")
    axes = figure.subplots(1, len(widths), squeeze=False, width_ratios=widths).ravel()
    _verdict_table(axes[0], table)
    if not tau_frame.empty:
        _tau_panel(axes[1], tau_frame)
    for ax, spectrum in zip(axes[len(widths) - len(spectra) :], spectra.values()):
        _density_panel(ax, spectrum)
    figure.suptitle(f"{runs.experiment}: the SAM paper's claims")
    notes = [f"{r['claim']}: {r['verdict']} ({r['measured']})" for r in table.to_dict("records")]
    notes += [
        f"Hessian eigenvalue density in {cell}: best SGD and best SAM of the search (one seed each), "
        f"{s.get('examples', '')}, computed once by the sweep"
        for cell, s in spectra.items()
    ] or [NO_DENSITY]
    data = {"claims": table, "tau_per_m": tau_frame, "spectral_density": density_frame(spectra)}
    return View(figure=figure, data=data, notes=notes)

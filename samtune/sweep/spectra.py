"""The Hessian's eigenvalue density of one cell's picks, for the claim that SAM finds flatter
minima (Foret et al. 2020, section 4.2, as PyHessian draws it): measured once, by the driver, after
the confirmation stage, and logged as ``spectral_density.json`` on the cell's run, which the cell
run's ``samtune.spectral_density`` tag names; the report's claims view draws it and computes
nothing.

One cell (`density_cell`): of the cells with ablation curves, else of every cell, the one of the
highest noise rate whose search picked an SGD and a SAM trial. Its best SGD and best SAM (one seed
each: the search's) are rebuilt from their last checkpoints, the final weights their MLflow models
hold (`samtune.sweep.pick_models`), and each is measured on the same fixed subset of the cell's
training set, with the labels trained on (`SETTINGS`: stochastic Lanczos quadrature,
`samtune.sharpness.density.spectral_density`). The density is given on one grid for both, each
node widened into a Gaussian of variance ``sigma_squared * max(1, |largest node|)`` as PyHessian
does. It costs 96 Hessian-vector products on 256 examples (`SETTINGS`; a product costs two to
three gradients), on a GPU where the driver has one, else on its CPU: 2 to 4 s a pick for a
300,000-parameter MLP on digits on 2 CPU cores shared with other work, minutes for a CIFAR ResNet
on a CPU. Like the models, it describes a result and makes none: a density
that cannot be measured is skipped with a warning, and a resumed driver logs the saved file again
without measuring.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from samtune.contract.keys import HEADLINE_KEYS
from samtune.contract.messages import first_line
from samtune.contract.tags import SPECTRAL_DENSITY_TAG
from samtune.data.scenarios import build_scenario
from samtune.data.transforms import to_float
from samtune.sharpness.density import spectral_density
from samtune.sweep.flatness import measures_hessian
from samtune.sweep.pick_models import checkpoint_model
from samtune.sweep.plan import Plan
from samtune.sweep.results import CellResult, TrialRow
from samtune.sweep.study import Sweep
from samtune.sweep.tracking import Tracker
from samtune.trial.config import resolve_config
from samtune.trial.seeding import sharpness_indices

log = logging.getLogger(__name__)

#: The artifact's name on the cell's run, and where the sweep's folder keeps it before.
ARTIFACT = "spectral_density.json"
SPECTRA_DIR = "spectra"
#: The quadrature: one Rademacher probe as PyHessian takes, of 48 Lanczos steps (PyHessian: 100;
#: every step is a Hessian-vector product, and 48 nodes already draw the bulk and the outliers
#: apart), on 256 training examples chosen by ``seed``; the grid and widening are PyHessian's
#: (10,000 bins, sigma^2 = 1e-5 of the spectrum's scale, 0.01 beyond its ends).
SETTINGS: dict[str, Any] = {
    "probes": 1,
    "steps": 48,
    "subset": 256,
    "seed": 0,
    "batch": 256,
    "bins": 10000,
    "sigma_squared": 1e-5,
    "overhead": 0.01,
}
PICKS = ("best_sgd", "best_sam")


def density_cell(sweep: Sweep, results: list[CellResult]) -> CellResult | None:
    """The cell measured: of the cells with ablations (else of all), the one of the highest
    noise rate (the first of equals) whose search picked an SGD and a SAM trial with a
    checkpoint; None where no cell has both."""

    def ready(result: CellResult) -> bool:
        picks = result.picks(sweep.metric, sweep.mode)
        return all(name in picks and picks[name].checkpoint is not None for name in PICKS)

    candidates = [r for r in results if ready(r)]
    ablated = [r for r in candidates if sweep.ablated(r.cell)]
    pool = ablated or candidates
    if not pool:
        return None
    return max(pool, key=lambda r: (r.cell.label_noise_rate, -r.cell.index))


def log_spectral_density(plan: Plan, results: list[CellResult], tracker: Tracker, sweep_key: str) -> Path | None:
    """Measure (unless a file from an earlier driver is there) and log the picks' spectral
    density of `density_cell`'s cell on its run; returns the file, None where none was made."""
    result = density_cell(plan.sweep, results)
    if result is None:
        return None
    if not measures_hessian(plan.sweep):
        # A sweep that measures no Hessian asked for no Hessian-vector products (on a CPU and a
        # large model they take minutes); the claims view says why no density is drawn.
        log.info("no spectral density: the sweep's sharpness_measures include no Hessian measure")
        return None
    folder = plan.sweep_dir / SPECTRA_DIR / result.cell.slug
    path = folder / ARTIFACT
    if not path.exists():
        try:
            payload = pick_spectra(plan.sweep, result)
        except Exception as exc:  # noqa: BLE001  any failure: the sweep's results stand without it
            log.warning("no spectral density for %s's picks: %s", result.cell.label, first_line(exc))
            return None
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{ARTIFACT}.partial"
        partial.write_text(json.dumps(payload))
        os.replace(partial, path)  # whole or not at all: a killed driver leaves no half file
        log.info(
            "the spectral density of %s's picks: %.1f s (%s)",
            result.cell.label,
            sum(payload["seconds"].values()),
            payload["settings"]["device"],
        )
    cell_key = f"{sweep_key}/{result.cell.slug}"
    tracker.log_artifacts(cell_key, folder)
    tracker.set_tags(cell_key, {SPECTRAL_DENSITY_TAG: ARTIFACT})
    return path


def pick_spectra(sweep: Sweep, result: CellResult, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spectral density of `result`'s best SGD and best SAM on one grid (module docstring):
    the JSON the claims view draws."""
    settings = {**SETTINGS, **(settings or {})}
    picks = result.picks(sweep.metric, sweep.mode)
    configs = {name: {**sweep.base_config(result.cell), **picks[name].params} for name in PICKS}
    # Both picks trained on the cell's one noisy dataset: the subset is the same examples for both.
    # The weights are the checkpoints': a finetuning cell's starting weights are not read.
    scenario = build_scenario(resolve_config(configs["best_sam"]), initial_state={})
    idx = sharpness_indices(len(scenario.train_y), settings["seed"], settings["subset"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = to_float(scenario.train_x[idx], scenario.mean, scenario.std).to(device)
    y = scenario.train_y[idx].to(device)
    measured, seconds, sizes = {}, {}, {}
    for name in PICKS:
        start = time.perf_counter()
        module, _ = checkpoint_model(configs[name], picks[name])
        measured[name] = spectral_density(
            module.to(device),
            F.cross_entropy,
            x,
            y,
            probes=settings["probes"],
            steps=settings["steps"],
            seed=settings["seed"],
            batch=settings["batch"],
        )
        seconds[name], sizes[name] = time.perf_counter() - start, measured[name].n
    grid, sigma = density_grid(
        [float(d.nodes.min()) for d in measured.values()],
        [float(d.nodes.max()) for d in measured.values()],
        settings,
    )
    return {
        "cell": result.cell.label,
        "label_noise_rate": result.cell.label_noise_rate,
        "what": "the Hessian's eigenvalue density of the training loss (stochastic Lanczos quadrature)",
        "examples": f"{len(idx)} training examples, the labels trained on",
        "settings": {**settings, "sigma": sigma, "device": device.type},
        "picks": {name: _pick(picks[name], configs[name]) for name in PICKS},
        "num_params": sizes,
        "seconds": seconds,
        "grid": [float(f"{v:.7g}") for v in grid.tolist()],
        "density": {name: [float(f"{v:.5g}") for v in d.curve(grid, sigma).tolist()] for name, d in measured.items()},
        "nodes": {name: d.nodes.tolist() for name, d in measured.items()},
        "weights": {name: d.weights.tolist() for name, d in measured.items()},
    }


def density_grid(lows: list[float], highs: list[float], settings: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """PyHessian's grid over every density's nodes (``overhead`` beyond the ends, ``bins``
    points) and its Gaussian's standard deviation, ``sqrt(sigma_squared * max(1, scale))``.

    >>> grid, sigma = density_grid([-1.0, 0.0], [10.0, 40.0], {"bins": 5, "overhead": 0.0, "sigma_squared": 1e-4})
    >>> grid.tolist(), sigma
    ([-1.0, 9.25, 19.5, 29.75, 40.0], 0.06324555320336758)
    """
    low, high = min(lows) - settings["overhead"], max(highs) + settings["overhead"]
    scale = max(1.0, abs(low), abs(high))
    grid = torch.linspace(low, high, int(settings["bins"]), dtype=torch.float64)
    return grid, math.sqrt(settings["sigma_squared"] * scale)


def _pick(row: TrialRow, config: dict[str, Any]) -> dict[str, Any]:
    shown = {key: config.get(key) for key in HEADLINE_KEYS}
    return {"trial_id": row.trial_id, **{k: v for k, v in shown.items() if v is not None}}

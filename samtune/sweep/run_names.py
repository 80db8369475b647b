"""The names a sweep's MLflow runs are listed by, so that the UI's run list reads: which sweep,
which cell, which optimizer with which searched settings, which role.

- sweep run: ``<sweep name> <sweep id>`` (``noisy-digits 1a2b3c4d``);
- cell run: the cell label (``noise=0.4``);
- trial run: cell, optimizer, the headline settings (`HEADLINE_KEYS`) the space searches,
  ``baseline`` for a declared baseline, and its place in the search (``noise=0.4 SAM lr=0.12
  rho=0.05 m=16 #3``, ``noise=0.4 SGD lr=0.05 baseline #0``);
- confirmation run: cell, pick and seed (``noise=0.4 best_sam seed 2``; the m ablation's
  ``noise=0.4 m=16 seed 2``).

Names are for reading only: a run is found again by its key (``samtune.key``,
`samtune.sweep.run_keys`), so a sweep started under other names resumes into the same runs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from samtune.contract.keys import HEADLINE_KEYS, optimizer_label
from samtune.sweep.study import Cell, Sweep


def sweep_run_name(name: str, sweep_id: str) -> str:
    """``<sweep name> <sweep id>`` (the name alone for a sweep from before sweep ids).

    >>> sweep_run_name("noisy-digits", "1a2b3c4d")
    'noisy-digits 1a2b3c4d'
    """
    return f"{name} {sweep_id}" if sweep_id else name


def trial_run_name(sweep: Sweep, cell: Cell, config: Mapping[str, Any], searched: Collection[str] | None = None) -> str:
    """A search trial's run name, from its config: the headline settings among `searched` (the
    settings the space suggests; None: every one not set for the whole cell).

    >>> sweep = Sweep(name="demo", dataset="digits", model="cnn", epochs=2, batch_size=32, trials=2,
    ...               label_noise_rates=(0.4,))
    >>> (cell,) = sweep.cells()
    >>> trial_run_name(sweep, cell, sweep.trial_config(cell, {"optimizer": "sam", "lr": 0.1234, "rho": 0.05,
    ...                                                      "m": 16, "trial_number": 3}))
    'noise=0.4 SAM lr=0.123 rho=0.05 m=16 #3'
    >>> trial_run_name(sweep, cell, sweep.trial_config(cell, {"optimizer": "sgd", "lr": 0.05, "baseline": True,
    ...                                                      "trial_number": 0, "weight_decay": 5e-4}),
    ...                searched={"optimizer", "lr", "rho", "m"})
    'noise=0.4 SGD lr=0.05 baseline #0'
    """
    cell_wide = sweep.base_config(cell)
    parts = [cell.label, optimizer_label(config)]
    parts += [
        f"{key}={_shown(config[key])}"
        for key in HEADLINE_KEYS
        if key != "optimizer" and key in config and key not in cell_wide and (searched is None or key in searched)
    ]
    if config.get("baseline"):
        parts.append("baseline")
    if config.get("trial_number") is not None:
        parts.append(f"#{config['trial_number']}")
    return " ".join(parts)


def rerun_name(cell: Cell, name: str, seed: int) -> str:
    """A confirmation (or m-ablation) run's name: cell, pick and seed.

    >>> rerun_name(Cell(1, 0.4, "noise=0.4"), "m=16", 2)
    'noise=0.4 m=16 seed 2'
    """
    return f"{cell.label} {name} seed {seed}"


def _shown(value: Any) -> str:
    """A setting as a name shows it: floats to 3 significant digits, anything else as written."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)

"""Each cell's data as an MLflow dataset input of its run: the MLflow UI then names, next to the
runs, what they trained on (the dataset and its label noise) and a digest of the labels trained
on, so two cells (or two sweeps) that saw the same noisy labels show the same digest."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from samtune.contract.messages import first_line
from samtune.data.scenarios import build_scenario
from samtune.sweep.study import Cell, Sweep
from samtune.sweep.tracking import Tracker

log = logging.getLogger(__name__)


def cell_dataset(sweep: Sweep, cell: Cell) -> dict[str, Any]:
    """The dataset input of ``cell``: name, digest of the training labels (noise included),
    source and profile. The finetune scenario's split is the label-noise one with starting
    weights added, so the labels are built without them."""
    config = {**sweep.base_config(cell), "scenario": "label_noise"}
    scenario = build_scenario(config)
    digest = hashlib.sha256(scenario.train_y.numpy().tobytes()).hexdigest()[:16]
    profile = {
        "train_examples": int(len(scenario.train_y)),
        "val_examples": int(len(scenario.val_y)),
        "test_examples": int(len(scenario.test_y)),
        "classes": int(scenario.num_classes),
        "label_noise_rate": cell.label_noise_rate,
        "label_noise_kind": cell.label_noise_kind,
        "flipped_labels": int((scenario.train_y != scenario.train_y_true).sum()),
        "data_seed": config.get("data_seed"),
    }
    return {
        "name": cell.label if cell.label_noise_kind != sweep.label_noise_kind else f"{sweep.dataset} {cell.label}",
        "digest": digest,
        "source": f"{sweep.dataset} (data_root={config.get('data_root')})",
        "profile": profile,
    }


def log_cell_datasets(sweep: Sweep, tracker: Tracker, sweep_key: str) -> None:
    """Every cell's dataset input on its run. A description that cannot be built (data moved
    since the sweep's checks) is skipped with a warning: it describes, it does not train."""
    for cell in sweep.cells():
        try:
            described = cell_dataset(sweep, cell)
        except Exception as exc:  # noqa: BLE001  the trials report any real data problem
            log.warning("no MLflow dataset input for %s: %s", cell.label, first_line(exc))
            continue
        tracker.log_dataset(f"{sweep_key}/{cell.slug}", **described)

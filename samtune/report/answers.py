"""The confirmation runs of a sweep, read back from MLflow, and the verdicts they support.

A sweep with ``confirm_seeds`` re-runs each cell's picks on fresh seeds (`samtune.sweep.confirm`):
runs tagged ``samtune.role=confirm`` (or ``ablation``), ``samtune.confirms`` and ``samtune.seed``,
under their cell's run. `confirmation_frame` tabulates them, one row per run, with the test error
under both selection rules; `verdicts` turns that table into `samtune.verdicts` verdicts (each
with its values by configuration, rule and seed under ``seed_values``).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from samtune.contract.keys import HEADLINE_KEYS
from samtune.contract.tags import CELL_TAG, CONFIRMS_TAG, SEED_TAG, STATUS_TAG
from samtune.report.runs import Runs, TrialRecord
from samtune.report.table import cell_order
from samtune.verdicts import cell_verdict

COLUMNS = [
    "cell",
    "confirms",
    "seed",
    "status",
    *HEADLINE_KEYS,
    "final_test_error",
    "best_test_error",
    "best_epoch",
    "pretrained_test_error",
    "run_id",
]


def _at_best_validation(record: TrialRecord, metric: str) -> tuple[float, float]:
    """``metric`` at the epoch of lowest validation error (NaN without one) and that epoch."""
    val = dict(record.history.get("val_error", []))
    values = dict(record.history.get(metric, []))
    if not val:
        return math.nan, math.nan
    epoch = min(val, key=lambda e: (val[e], e))
    return values.get(epoch, math.nan), float(epoch)


def confirmation_frame(records: list[TrialRecord]) -> pd.DataFrame:
    """One row per confirmation (or ablation) run: which cell, configuration and seed, how it
    ended, its test error at the final epoch and at its best validation epoch, and (finetuning)
    its starting point's test error."""
    rows = []
    for record in records:
        final = record.history.get("test_error", [])
        start = record.history.get("pretrained_test_error", [])
        best, epoch = _at_best_validation(record, "test_error")
        rows.append(
            {
                "cell": record.tags.get(CELL_TAG, ""),
                "confirms": record.tags.get(CONFIRMS_TAG, ""),
                "seed": int(record.tags.get(SEED_TAG, record.params.get("seed", 0))),
                "status": record.tags.get(STATUS_TAG, ""),
                **{key: record.params.get(key) for key in HEADLINE_KEYS},
                "final_test_error": final[-1][1] if final else math.nan,
                "best_test_error": best,
                "best_epoch": epoch,
                "pretrained_test_error": start[0][1] if start else math.nan,
                "run_id": record.run_id,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def verdicts(runs: Runs) -> list[dict[str, Any]]:
    """The verdict of every cell that has confirmation runs, in the table's cell order. A pick
    that another pick's runs stand for (the SAM baseline that is also the best SAM, an ablated
    value that is the best SAM's own) is read from those runs, as the cell run's aliases tag says."""
    frame = runs.confirmations
    if frame.empty:
        return []
    out = []
    ordered = [c for c in cell_order(runs.trials) if c in set(frame["cell"])]
    for cell in ordered + [c for c in pd.unique(frame["cell"]) if c not in ordered]:
        part = frame[(frame["cell"] == cell) & (frame["status"] == "finished")]
        values: dict[str, dict[str, dict[int, float]]] = {}
        # What the curves read of a pick: its own m and rho (the lr curve is in multipliers of it).
        params = {
            str(name): {"m": _m(group["m"].iloc[0]), "rho": _number(group["rho"].iloc[0])}
            for name, group in part.groupby("confirms")
        }
        for name, group in part.groupby("confirms"):
            values[str(name)] = {
                rule: {
                    int(r.seed): float(getattr(r, column))
                    for r in group.itertuples()
                    if math.isfinite(getattr(r, column))
                }
                for rule, column in (("final", "final_test_error"), ("best_epoch", "best_test_error"))
            }
        for alias, name in _aliases(runs, cell).items():
            if name in values and alias not in values:
                values[alias] = values[name]
        verdict = cell_verdict(str(cell), values, params, design=runs.design)
        verdict["seed_values"] = values  # what further comparisons (the claims table) pair by seed
        if missing := _missing(runs.trials, str(cell)):
            verdict["missing"] = missing
        out.append(verdict)
    return out


def _missing(trials: pd.DataFrame, cell: str) -> str:
    """What a cell's verdict lacks, as the sweep judged it (`CellResult.missing`): a baseline
    trial that failed, or an optimizer none of whose trials ran to the end or to ASHA's stop."""
    if trials.empty or "cell" not in trials:
        return ""
    own = trials[trials["cell"] == cell]
    if own.empty:
        return ""
    optimizer = own["optimizer"].astype(str) if "optimizer" in own else pd.Series("sgd", index=own.index)
    failed = own["status"] == "failed"
    baseline = own["baseline"].eq(True) if "baseline" in own else pd.Series(False, index=own.index)
    reasons = [f"its {name.upper()} baseline failed" for name in optimizer[failed & baseline]]
    ran = set(optimizer[own["status"].isin(("finished", "stopped"))])
    for name, family in (("SGD", {"sgd"}), ("SAM", {"sam", "asam"})):
        if not ran & family:
            reasons.append(f"no {name} trial of the search finished")
    return "; ".join(reasons)


def _m(value: Any) -> int | None:
    """m as MLflow keeps it (text; "None" or absent: the whole per-worker batch)."""
    text = str(value).strip()
    return int(float(text)) if text not in ("", "None", "nan") else None


def _number(value: Any) -> float | None:
    """A number as MLflow keeps it (text; absent or "None": None)."""
    try:
        number = float(str(value))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _aliases(runs: Runs, cell: str) -> dict[str, str]:
    """Picks the sweep ran once for two names, from the cell run's ``samtune.aliases`` tag."""
    text = runs.aliases.get(cell, "")
    return dict(part.split(":", 1) for part in text.split(",") if ":" in part)

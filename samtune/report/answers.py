"""The confirmation runs of a sweep, read back from MLflow, and the verdicts they support.

A sweep with ``confirm_seeds`` re-runs each cell's picks on fresh seeds (`samtune.sweep.confirm`):
runs tagged ``samtune.role=confirm`` (or ``ablation``), ``samtune.confirms`` and ``samtune.seed``,
under their cell's run. `confirmation_frame` tabulates them, one row per run, with the test error
under both selection rules (and the Hessian's top eigenvalues where a run measured them);
`verdicts` turns that table into `samtune.verdicts` verdicts (each with its values by
configuration, rule and seed under ``seed_values``). `human_minus_twin` pairs
each human label noise cell with its synthetic twin: SAM's gain over SGD per seed in each, and
the difference of the two by seed with its Student-t interval (`human_twin_table` tabulates it).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from samtune.contract.keys import HEADLINE_KEYS
from samtune.contract.tags import CELL_TAG, CONFIRMS_TAG, SEED_TAG, STATUS_TAG
from samtune.report.runs import Runs, TrialRecord
from samtune.report.table import cell_order
from samtune.stats import Estimate, difference, mean_interval
from samtune.verdicts import RULES, cell_verdict

#: The sharpness some confirmation runs measure at their last epoch (`samtune.sweep.flatness`):
#: the Hessian's top eigenvalue, its spread lambda_1 / lambda_5 and their Lanczos residual bound.
CONFIRMED_SHARPNESS = (
    "sharpness/hessian_top_eig",
    "sharpness/hessian_top_eig_1_over_5",
    "sharpness/hessian_top_eig/residual",
)
#: The metrics whose whole history `confirmation_frame` reads (of the others, the latest value).
HISTORIES = ("test_error", "val_error", "pretrained_test_error")
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
    *CONFIRMED_SHARPNESS,
    "run_id",
]


def _last(record: TrialRecord, metric: str) -> float:
    """``metric`` at the run's last logged epoch; NaN where it logged none."""
    history = record.history.get(metric, [])
    return float(max(history)[1]) if history else record.latest.get(metric, math.nan)


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
                **{key: _last(record, key) for key in CONFIRMED_SHARPNESS},
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


# -- human label noise against its synthetic twin -----------------------------------------------------


def human_twin_cells(trials: pd.DataFrame) -> list[tuple[str, str | None]]:
    """Each cell trained on human labels (``human:<set>``) with the cell of its synthetic twin
    (``twin:<set>``; None where the sweep has none), from the trials' ``label_noise_kind``."""
    if trials.empty or "label_noise_kind" not in trials or "cell" not in trials:
        return []
    kinds = trials.drop_duplicates("cell").set_index("cell")["label_noise_kind"].astype(str)
    cell_of_kind = {kind: str(cell) for cell, kind in kinds.items()}
    return [
        (str(cell), cell_of_kind.get("twin:" + kind.removeprefix("human:")))
        for cell, kind in kinds.items()
        if kind.startswith("human:")
    ]


def seed_gains(verdict: dict[str, Any], rule: str) -> dict[int, float]:
    """SAM's gain over SGD per seed in one cell: best SGD's test error minus best SAM's, for each
    seed both ran under ``rule`` (positive: SAM lower)."""
    values = verdict.get("seed_values", {})
    sgd, sam = values.get("best_sgd", {}).get(rule, {}), values.get("best_sam", {}).get(rule, {})
    return {seed: sgd[seed] - sam[seed] for seed in sorted(sgd) if seed in sam}


def human_minus_twin(runs: Runs, found: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per human noise cell with a twin and per selection rule: SAM's gain over SGD under human
    noise minus its gain under the synthetic twin (`seed_gains` of each cell), paired by seed
    (`samtune.stats.difference`: the seeds both cells ran, two or more; else Welch's interval).

    Each row holds the cells, the rule, both cells' gains and their difference as Estimates (None
    where there is none), the seeds used and left out, and ``reading``: the plain sentence, or
    why there is no difference to give. ``found``: the verdicts, if already read (`verdicts`)."""
    pairs = human_twin_cells(runs.trials)
    if not pairs:
        return []
    by_cell = {v["cell"]: v for v in (verdicts(runs) if found is None else found)}
    rows = []
    for human, twin in pairs:
        both = [by_cell.get(human), by_cell.get(twin)] if twin is not None else []
        rules = [r for r in RULES if any(r in v["rules"] for v in both if v)] or [next(iter(RULES))]
        for rule in rules:
            row: dict[str, Any] = {"human_cell": human, "twin_cell": twin or "", "rule": rule}
            row.update(human=None, twin=None, difference=None, seeds=[], left_out=[])
            if twin is None:
                row["reading"] = "no twin cell in this sweep (human_noise_twins=False): nothing to compare with"
            elif why := _no_gains(runs, [(human, both[0]), (twin, both[1])], rule):
                row["reading"] = why
            else:
                row.update(_compare(seed_gains(both[0] or {}, rule), seed_gains(both[1] or {}, rule)))
            rows.append(row)
    return rows


#: Test errors are fractions; the gains read in percentage points.
POINTS = 100.0
_PICKS = (("best_sgd", "best SGD"), ("best_sam", "best SAM"))


def _no_gains(runs: Runs, cells: list[tuple[str, dict[str, Any] | None]], rule: str) -> str:
    """Why a human/twin pair has no difference under ``rule`` ("" when both cells have gains)."""
    if runs.confirmations.empty:
        return "no comparison: this sweep ran no confirmation stage (confirm_seeds=0), so there are no seeds to pair"
    reasons = [f"{cell}: {why}" for cell, v in cells if (why := _why_no_gains(runs.confirmations, cell, v, rule))]
    return "no comparison: " + "; ".join(reasons) if reasons else ""


def _why_no_gains(frame: pd.DataFrame, cell: str, verdict: dict[str, Any] | None, rule: str) -> str:
    """Why ``cell`` has no seed with both a best SGD and a best SAM result under ``rule``."""
    if verdict is not None and seed_gains(verdict, rule):
        return ""
    own = frame[frame["cell"] == cell]
    values = (verdict or {}).get("seed_values", {})
    reasons = []
    for name, label in _PICKS:
        runs_of = own[own["confirms"] == name]
        finished = runs_of[runs_of["status"] == "finished"]
        if values.get(name, {}).get(rule):
            continue
        if runs_of.empty:
            reasons.append(f"no confirmation run of its {label} was recorded")
        elif finished.empty:
            statuses = ", ".join(f"{s} {n}" for s, n in runs_of["status"].value_counts().items())
            reasons.append(f"none of its {label}'s {len(runs_of)} confirmation runs finished ({statuses})")
        else:
            reasons.append(f"its {label}'s runs logged no {'test' if rule == 'final' else 'validation'} error")
    why = "; ".join(reasons) or "its best SGD and best SAM ran no seed in common"
    missing = (verdict or {}).get("missing")
    return f"{why} ({missing})" if missing else why


def _compare(human: dict[int, float], twin: dict[int, float]) -> dict[str, Any]:
    """The difference of two cells' gains by seed, both cells' gains on the seeds it used, and
    the sentence that says it."""
    est = difference(human, twin)
    shared = sorted(set(human) & set(twin))
    used = shared if est.paired else sorted(set(human) | set(twin))
    return {
        "human": mean_interval([human[s] for s in used if s in human]),
        "twin": mean_interval([twin[s] for s in used if s in twin]),
        "difference": est,
        "seeds": used,
        "left_out": sorted(set(human) ^ set(twin)) if est.paired else [],
        "reading": _reading(est, human, twin, shared),
    }


def _reading(est: Estimate, human: dict[int, float], twin: dict[int, float], shared: list[int]) -> str:
    """The difference in plain words, in percentage points, with the seeds behind it."""
    if est.paired:
        seeds = f"{est.n} seeds, paired"
        left_out = sorted(set(human) ^ set(twin))
        if left_out:
            seeds += f" (seed {', '.join(map(str, left_out))} left out: not run with both SGD and SAM in both cells)"
    else:
        seeds = (
            f"unpaired (Welch): the cells share {len(shared)} seed(s) with both SGD and SAM runs; "
            f"{len(human)} seed(s) under human noise, {len(twin)} under the twin"
        )
    mean, low, high = (POINTS * x for x in (est.mean, est.low, est.high))
    if not (math.isfinite(low) and math.isfinite(high)):
        way = "larger" if mean >= 0 else "smaller"
        return (
            f"SAM's gain is {abs(mean):.2f} points {way} under human noise than under its synthetic twin "
            f"(too few seeds for an interval), {seeds}"
        )
    if est.covers_zero:
        return (
            f"no detectable difference: SAM's gain under human noise minus its gain under the synthetic twin "
            f"is {mean:+.2f} points [{low:+.2f}, {high:+.2f}], {seeds}"
        )
    if mean > 0:
        return (
            f"SAM's gain is {mean:.2f} points larger under human noise than under its synthetic twin "
            f"[{low:.2f}, {high:.2f}], {seeds}"
        )
    return (
        f"SAM's gain is {-mean:.2f} points smaller under human noise than under its synthetic twin "
        f"[{-high:.2f}, {-low:.2f}], {seeds}"
    )


def human_twin_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """`human_minus_twin`'s rows as the report's table: the gains and their difference in
    percentage points (mean, low, high: empty where there is none), seeds, and the reading."""
    out = []
    for row in rows:
        record: dict[str, Any] = {
            "human cell": row["human_cell"],
            "twin cell": row["twin_cell"],
            "selection": RULES[row["rule"]],
        }
        for key, label in (("human", "SAM gain, human"), ("twin", "SAM gain, twin")):
            est = row[key]
            record[f"{label} (points)"] = POINTS * est.mean if est is not None else math.nan
        est = row["difference"]
        for part in ("mean", "low", "high"):
            value = getattr(est, part) if est is not None else math.nan
            record[f"human - twin {part} (points)"] = POINTS * value
        record["seeds"] = len(row["seeds"])
        record["paired"] = bool(est is not None and est.paired)
        record["reading"] = row["reading"]
        out.append(record)
    columns = ["human cell", "twin cell", "selection", "SAM gain, human (points)", "SAM gain, twin (points)"]
    columns += [f"human - twin {p} (points)" for p in ("mean", "low", "high")] + ["seeds", "paired", "reading"]
    return pd.DataFrame(out, columns=columns)

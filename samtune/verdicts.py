"""Verdicts: per cell, what the confirmation runs say about SAM against SGD, with intervals.

Free of torch, Ray and MLflow: the sweep gives it its confirmation runs' results as they end, the
report the same results read back from MLflow.

For each confirmed configuration, the test error's mean over seeds with a 95% Student-t interval;
for SAM against SGD, the difference of the best SAM and best SGD configurations (and of the SAM
baseline and best SGD), paired by seed, with its own interval (`samtune.stats`). Each is given
under two selection rules, and says which: the final epoch, and the epoch of lowest validation
error (early stopping on the noisy validation set, which under label noise can change the
answer). A difference whose interval covers 0 is "no detectable difference", not a winner.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from samtune.stats import Estimate, difference, mean_interval, verdict

#: The selection rules, as the tables name them.
RULES = {"final": "final epoch", "best_epoch": "best validation epoch"}
COMPARED = (("best_sam", "best_sgd"), ("sam_baseline", "best_sgd"))


#: A cell's confirmation results: configuration name -> selection rule -> seed -> value.
SeedValues = dict[str, dict[str, dict[int, float]]]


def cell_verdict(cell: str, values: SeedValues, params: dict[str, dict[str, Any]] | None = None,
                 metric: str = "test_error") -> dict[str, Any]:
    """The verdict of one cell from its confirmation results: estimates per configuration and
    rule, the SAM - SGD differences, and the m curve (configurations named ``m=<m>``).

    >>> v = cell_verdict("noise=0.4", {"best_sgd": {"final": {1: 0.30, 2: 0.32, 3: 0.31}},
    ...                                "best_sam": {"final": {1: 0.20, 2: 0.21, 3: 0.21}}})
    >>> verdict_rows([v])[0]["verdict"]
    'SAM lower by 0.103 (95% CI 0.089 to 0.118)'
    """
    rules = [r for r in RULES if any(values[name].get(r) for name in values)]
    out: dict[str, Any] = {"cell": cell, "metric": metric, "rules": rules, "configs": {},
                           "differences": {}, "m_curve": {}}
    for name in sorted(values):
        out["configs"][name] = {"params": (params or {}).get(name, {}), **{
            rule: mean_interval(list(values[name].get(rule, {}).values())) for rule in rules}}
    for first, second in COMPARED:
        if first in values and second in values:
            out["differences"][f"{first} - {second}"] = {
                rule: difference(values[first].get(rule, {}), values[second].get(rule, {})) for rule in rules}
    curve = [name for name in values if name.startswith("m=")]
    if curve and "best_sam" in values:
        # The best SAM configuration is a point of its own m ablation, at its own m.
        own = f"m={out['configs']['best_sam']['params'].get('m')}"
        if own not in values:
            out["configs"][own] = out["configs"]["best_sam"]
            curve.append(own)
    for name in sorted(curve, key=_m_order):
        out["m_curve"][name[2:]] = {rule: out["configs"][name][rule] for rule in rules}
    return out


def _m_order(name: str) -> tuple[int, int]:
    m = name[2:] if name.startswith("m=") else ""
    return (0, 0) if m in ("None", "") else (1, -int(m)) if m.isdigit() else (2, 0)


def verdict_rows(verdicts: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per cell and selection rule: SGD, SAM, their difference and what it supports."""
    rows = []
    for v in verdicts:
        diff = v["differences"].get("best_sam - best_sgd")
        for rule in v["rules"]:
            sgd, sam = v["configs"].get("best_sgd", {}).get(rule), v["configs"].get("best_sam", {}).get(rule)
            rows.append({"cell": v["cell"], "selection": RULES[rule],
                         "SGD": sgd.text() if sgd else "-", "SAM": sam.text() if sam else "-",
                         "SAM - SGD": diff[rule].text() if diff else "-",
                         "verdict": verdict(diff[rule]) if diff else "needs both SGD and SAM runs",
                         "seeds": str(min(sgd.n, sam.n)) if sgd and sam else "0"})
    return rows


def markdown(verdicts: list[dict[str, Any]], metric: str = "test_error") -> str:
    """The verdict table as markdown (the sweep run's description in the MLflow UI)."""
    rows = verdict_rows(verdicts)
    if not rows:
        return ""
    head = list(rows[0])
    lines = [f"**SAM vs SGD, {metric} (mean [95% CI] over confirmation seeds)**", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Estimate):
        return {"mean": value.mean, "low": value.low, "high": value.high, "n": value.n,
                "level": value.level, "paired": value.paired}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write(verdicts: list[dict[str, Any]], folder: Path) -> Path:
    """``verdicts.json`` and ``verdicts.md`` in ``folder`` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "verdicts.json").write_text(json.dumps(_jsonable(verdicts), indent=1, allow_nan=True))
    (folder / "verdicts.md").write_text(markdown(verdicts))
    return folder

"""Verdicts: per cell, what the confirmation runs say about SAM against SGD, with intervals.

Free of torch, Ray and MLflow: the sweep gives it its confirmation runs' results as they end, the
report the same results read back from MLflow.

For each confirmed configuration, the test error's mean over seeds with a 95% Student-t interval;
for SAM against SGD, the difference of the best SAM and best SGD configurations (and of the SAM
baseline and best SGD), paired by seed, and the decision it supports under the sweep's sequential
design (`samtune.sequential`: SAM better, SGD better, equivalent within the margin, or undecided
at n seeds), with the interval that decided it. Each is given under two selection rules, and says
which: the final epoch, and the epoch of lowest validation error (early stopping on the noisy
validation set, which under label noise can change the answer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from samtune.sequential import Decision, Design, decide, no_worse, paired
from samtune.stats import Estimate, mean_interval

#: The selection rules, as the tables name them.
RULES = {"final": "final epoch", "best_epoch": "best validation epoch"}
# The SAM baseline against best SAM: is the paper's rho = 0.05 as good as the searched rho?
COMPARED = (
    ("best_sam", "best_sgd"),
    ("sam_baseline", "best_sgd"),
    ("sam_baseline", "best_sam"),
    # The paper's rho with the best SAM configuration's other settings (the rho ablation's point).
    ("rho=0.05", "best_sgd"),
    ("rho=0.05", "best_sam"),
)


#: A cell's confirmation results: configuration name -> selection rule -> seed -> value.
SeedValues = dict[str, dict[str, dict[int, float]]]


def cell_verdict(
    cell: str,
    values: SeedValues,
    params: dict[str, dict[str, Any]] | None = None,
    metric: str = "test_error",
    design: Design | None = None,
) -> dict[str, Any]:
    """The verdict of one cell from its confirmation results: estimates per configuration and
    rule, the SAM - SGD decisions with their intervals, the m curve (configurations named
    ``m=<m>``) and every ablation's curve with its robust range (`ablation_curves`). `design`: the sweep's looks and margin; None judges all the seeds at once (one
    look, a 95% interval).

    >>> v = cell_verdict("noise=0.4", {"best_sgd": {"final": {1: 0.30, 2: 0.32, 3: 0.31}},
    ...                                "best_sam": {"final": {1: 0.20, 2: 0.21, 3: 0.21}}})
    >>> verdict_rows([v])[0]["verdict"]
    'SAM better: lower by 0.103 (95.0% CI -0.118 to -0.089)'
    """
    rules = [r for r in RULES if any(values[name].get(r) for name in values)]
    if design is None:
        most = max((len(v) for by_rule in values.values() for v in by_rule.values()), default=0)
        design = Design(looks=(max(most, 1),))
    out: dict[str, Any] = {
        "cell": cell,
        "metric": metric,
        "rules": rules,
        "configs": {},
        "differences": {},
        "decisions": {},
        "rows": {},
        "m_curve": {},
        "curves": {},
        "design": {"looks": list(design.looks), "alpha": design.alpha, "margin": design.margin},
    }
    for name in sorted(values):
        out["configs"][name] = {
            "params": (params or {}).get(name, {}),
            **{
                # In seed order: a sum in the order runs happened to end differs in the last bit.
                rule: mean_interval(_by_seed(values[name].get(rule, {})))
                for rule in rules
            },
        }
    out["decisions"] = _decisions(values, rules, design)
    out["differences"] = {key: {r: d.interval for r, d in by_rule.items()} for key, by_rule in out["decisions"].items()}
    out["rows"] = _decided_rows(values, out["decisions"].get("best_sam - best_sgd", {}), design)
    out["m_curve"] = _m_curve(values, out["configs"], rules)
    out["curves"] = ablation_curves(values, out["configs"], rules, design)
    return out


def _decisions(values: SeedValues, rules: list[str], design: Design) -> dict[str, dict[str, Decision]]:
    """Per compared pair present (`COMPARED`) and rule, the decision of their difference paired by
    seed: against best SAM, whether the first is no worse than it (`against_optimum`, the rule of
    the curves' robust ranges), else SAM against SGD."""
    return {
        f"{first} - {second}": {
            rule: against_optimum(values, first, second, rule, design)
            if second == "best_sam"
            else decide(paired(values[first].get(rule, {}), values[second].get(rule, {})), design)
            for rule in rules
        }
        for first, second in COMPARED
        if first in values and second in values
    }


def against_optimum(values: SeedValues, name: str, optimum: str, rule: str, design: Design) -> Decision:
    """Whether configuration ``name`` is no worse than ``optimum`` (the pick it was moved from)
    by more than the margin, under ``rule``: their difference paired by seed, judged by
    `samtune.sequential.no_worse` on the verdicts' own intervals (the sequential design's level
    at the look its seeds reach) and margin. One rule for an ablation curve's robust range and
    for the claims it answers (rho = 0.05 against the searched rho), so the two cannot disagree."""
    differences = paired(values[name].get(rule, {}), values[optimum].get(rule, {}))
    return decide(differences, design, judge=no_worse, compared=f"{name} - {optimum}")


def _decided_rows(values: SeedValues, main: dict[str, Decision], design: Design) -> dict[str, dict[str, Estimate]]:
    """Per rule of the SAM - SGD decision, best SGD's and best SAM's estimates on the seeds it used."""
    rows = {}
    for rule, decision in main.items():
        # SGD and SAM on the seeds the decision used (a row decided early is not shown on seeds
        # the cell ran later for its other row).
        used = sorted(paired(values["best_sam"].get(rule, {}), values["best_sgd"].get(rule, {})))
        used = used[: design.looks[decision.look]]
        rows[rule] = {name: mean_interval([values[name][rule][s] for s in used]) for name in ("best_sgd", "best_sam")}
    return rows


def _m_curve(values: SeedValues, configs: dict[str, Any], rules: list[str]) -> dict[str, dict[str, Any]]:
    """The estimates per m of the configurations named ``m=<m>``, best SAM's own m included (added
    to `configs` when no configuration of the ablation has it), largest m first."""
    curve = [name for name in values if name.startswith("m=")]
    if curve and "best_sam" in values:
        # The best SAM configuration is a point of its own m ablation, at its own m.
        own = f"m={configs['best_sam']['params'].get('m')}"
        if own not in values:
            configs[own] = configs["best_sam"]
            curve.append(own)
    return {name[2:]: {rule: configs[name][rule] for rule in rules} for name in sorted(curve, key=_m_order)}


#: The curves an ablation draws (`samtune.sweep.ablations`): run-name prefix -> the pick it moves.
CURVES = {"m": "best_sam", "rho": "best_sam", "lr": "best_sam", "sgd lr": "best_sgd"}


def ablation_curves(
    values: SeedValues, configs: dict[str, Any], rules: list[str], design: Design
) -> dict[str, dict[str, Any]]:
    """Per curve of `CURVES` with runs (``rho=0.02``, ``lr=x0.5``, ``sgd lr=x2``, ``m=16``): its
    points in order of the value, each with its estimate per rule (95% interval) and its
    difference from the optimum (the pick the curve moves, at its own value, a point of its own
    curve) paired by seed, with the decision `against_optimum` makes of it (``<rule> decision``;
    the difference is that decision's interval, at the verdicts' level); and its robust range per
    rule: the values decided no worse than the optimum by more than the design's margin, and the
    run of such values around the optimum (``robust_range``: its lowest and highest)."""
    out: dict[str, dict[str, Any]] = {}
    for key, of in CURVES.items():
        names = [n for n in values if n.startswith(f"{key}=")]
        if not names or of not in values:
            continue
        points = {_point_value(key, n): n for n in names}
        own = _own_value(key, configs[of]["params"])
        points.setdefault(own, of)
        ordered = sorted(points, key=lambda v: _value_order(key, v))
        rows = []
        for value in ordered:
            name = points[value]
            row: dict[str, Any] = {"name": name, "value": value, "label": _label(key, value), "optimum": value == own}
            for rule in rules:
                row[rule] = mean_interval(_by_seed(values[name].get(rule, {})))
                row[f"{rule} decision"] = decision = against_optimum(values, name, of, rule, design)
                row[f"{rule} difference"] = decision.interval
            rows.append(row)
        out[key] = {"setting": key.removeprefix("sgd "), "of": of, "optimum": _label(key, own), "points": rows}
        out[key]["robust"], out[key]["robust_range"] = _robust(rows, rules)
    return out


def _robust(rows: list[dict[str, Any]], rules: list[str]) -> tuple[dict, dict]:
    robust, spans = {}, {}
    for rule in rules:
        ok = [r["optimum"] or r[f"{rule} decision"].outcome == "no worse" for r in rows]
        robust[rule] = [r["label"] for r, good in zip(rows, ok) if good]
        at = next(i for i, r in enumerate(rows) if r["optimum"])
        low = high = at
        while low > 0 and ok[low - 1]:
            low -= 1
        while high < len(rows) - 1 and ok[high + 1]:
            high += 1
        spans[rule] = [rows[low]["label"], rows[high]["label"]]
    return robust, spans


def _point_value(key: str, name: str) -> Any:
    text = name.split("=", 1)[1].removeprefix("x")
    if key == "m":
        return None if text == "None" else int(text)
    return float(text)


def _own_value(key: str, params: dict[str, Any]) -> Any:
    """The pick's own value of a curve's setting: lr x1, rho as it ran (the trainer's 0.05 if
    unset), m as it ran (None: the whole batch)."""
    if key.endswith("lr"):
        return 1.0
    if key == "rho":
        rho = params.get("rho")
        return float(rho) if rho is not None else 0.05
    m = params.get("m")
    return None if m in (None, "None", "") else int(m)


def _value_order(key: str, value: Any) -> tuple[int, float]:
    # m as the m curve shows it: the whole batch first, then largest m first.
    if key == "m":
        return (0, 0.0) if value is None else (1, -float(value))
    return (0, float(value))


def _label(key: str, value: Any) -> str:
    return f"x{value:g}" if key.endswith("lr") else f"{value:g}" if isinstance(value, float) else str(value)


def _by_seed(by_seed: dict[int, float]) -> list[float]:
    return [by_seed[seed] for seed in sorted(by_seed)]


def _m_order(name: str) -> tuple[int, int]:
    m = name[2:] if name.startswith("m=") else ""
    return (0, 0) if m in ("None", "") else (1, -int(m)) if m.isdigit() else (2, 0)


def verdict_rows(verdicts: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per cell and selection rule: SGD and SAM (on the seeds the decision used), their
    difference with the interval that decided, the decision, and where it was made."""
    rows = []
    for v in verdicts:
        decisions = v.get("decisions", {}).get("best_sam - best_sgd")
        missing = v.get("missing")
        # A cell that lost what it compares still gets its row: the answer says what is missing.
        for rule in v["rules"] or ([next(iter(RULES))] if missing else []):
            shown = v.get("rows", {}).get(rule, {})
            sgd = shown.get("best_sgd") or v["configs"].get("best_sgd", {}).get(rule)
            sam = shown.get("best_sam") or v["configs"].get("best_sam", {}).get(rule)
            decision: Decision | None = decisions.get(rule) if decisions else None
            rows.append(
                {
                    "cell": v["cell"],
                    "selection": RULES[rule],
                    "SGD": sgd.text() if sgd else "-",
                    "SAM": sam.text() if sam else "-",
                    "SAM - SGD": decision.interval.text() if decision else "-",
                    "verdict": f"none: {missing}"
                    if missing
                    else decision.text()
                    if decision
                    else "needs both SGD and SAM runs",
                    "seeds": str(decision.n) if decision else "0",
                    "decided": decision.where() if decision else "-",
                }
            )
    return rows


def markdown(verdicts: list[dict[str, Any]], metric: str = "test_error") -> str:
    """The verdict table as markdown (the sweep run's description in the MLflow UI)."""
    rows = verdict_rows(verdicts)
    if not rows:
        return ""
    head = list(rows[0])
    design = verdicts[0].get("design", {})
    lines = [
        f"**SAM vs SGD, {metric}**: SGD and SAM as mean [95% CI] over the confirmation seeds the "
        f"decision used; SAM - SGD with the interval that decided (seeds added in rounds at "
        f"{', '.join(map(str, design.get('looks', [])))} until decided, "
        f"{1 - design.get('alpha', 0.05):.0%} overall; equivalent: within +/-{design.get('margin', 0.01):g})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def jsonable(value: Any) -> Any:
    if isinstance(value, Decision):
        return {
            "outcome": value.outcome,
            "look": value.look,
            "n": value.n,
            "text": value.text(),
            "interval": jsonable(value.interval),
        }
    if isinstance(value, Estimate):
        return {
            "mean": value.mean,
            "low": value.low,
            "high": value.high,
            "n": value.n,
            "level": value.level,
            "paired": value.paired,
        }
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write(verdicts: list[dict[str, Any]], folder: Path) -> Path:
    """``verdicts.json`` and ``verdicts.md`` in ``folder`` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "verdicts.json").write_text(json.dumps(jsonable(verdicts), indent=1, allow_nan=True))
    (folder / "verdicts.md").write_text(markdown(verdicts))
    return folder

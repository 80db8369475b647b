"""The SAM paper's claims (Foret et al. 2020, arXiv 2010.01412) that a sweep's runs can test, one
row each: the claim, where the paper makes it, what is compared, the measured value with its 95%
interval, and a verdict by the cells' decision rule (`samtune.sequential`): "holds" or "does not
hold" where the interval decides, "undecided at n ..." where it does not, "not tested" with what
would test it where the sweep has no runs for it.

Test errors come from the confirmation runs (fresh seeds, paired by seed), read back by
`samtune.report.answers`; the Hessian's top eigenvalues from the best SGD and best SAM
confirmation runs that measured them (`samtune.sweep.flatness`), paired by seed, else from the
search trials the sweep picked (one run per configuration and cell, so cells are the replicates); Kendall's tau per m from every plotted
search trial that logged m-sharpness at several m (``sharpness/m_sharpness_at_m<m>``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

from samtune.report.answers import verdicts
from samtune.report.runs import Runs
from samtune.report.table import best_per_optimizer, choice_metric
from samtune.sequential import Decision, Design, decide, outcome_of, paired
from samtune.stats import Estimate, TauInterval, kendall_tau_interval, mean_interval, slope_interval
from samtune.stats import tau_difference_interval as tau_difference

COLUMNS = ["claim", "source", "compared", "measured", "verdict", "basis"]
#: The sharpness a flatness claim compares, by the column a trial logs.
FLATNESS = {"lambda_max": "sharpness/hessian_top_eig", "lambda_max / lambda_5": "sharpness/hessian_top_eig_1_over_5"}
FLATNESS_SOURCE = "Section 4.2 (Hessian spectra)"
AT_M = re.compile(r"^sharpness/m_sharpness_at_m(\d+)$")
GAP = "final_generalization_gap"


def row(claim: str, source: str, compared: str, measured: str, verdict: str, basis: str) -> dict[str, str]:
    """One claims-table row."""
    return dict(zip(COLUMNS, (claim, source, compared, measured, verdict, basis)))


def judged(outcome: str, holds: str, n: int, unit: str = "seeds") -> str:
    """A sequential outcome (`samtune.sequential.OUTCOMES`) as the claim's verdict: "holds"
    where it is the outcome ``holds`` names, "undecided at n <unit>" where undecided, else "does
    not hold".

    >>> judged("SAM better", "SAM better", 5), judged("equivalent", "SAM better", 5)
    ('holds', 'does not hold')
    >>> judged("undecided", "SAM better", 3, "cells")
    'undecided at 3 cells'
    """
    if outcome == "undecided":
        return f"undecided at {n} {unit}"
    return "holds" if outcome == holds else "does not hold"


def _scenarios(runs: Runs) -> dict[str, tuple[str, float]]:
    """Each cell's scenario and label-noise rate, from its search trials."""
    trials = runs.trials
    if trials.empty or "cell" not in trials:
        return {}
    out = {}
    for cell, group in trials.groupby("cell", sort=False):
        first = group.iloc[0]
        rate = pd.to_numeric(pd.Series([first.get("label_noise_rate", 0.0)]), errors="coerce").iloc[0]
        out[str(cell)] = (str(first.get("scenario", "label_noise")), float(rate) if pd.notna(rate) else 0.0)
    return out


def _per_cell(found: list[dict[str, Any]], cells: set[str], claim: str, source: str) -> list[dict[str, str]]:
    """SAM against SGD in each of ``cells``: the cell verdict's decision at the final epoch."""
    rows = []
    for v in found:
        decision = v["decisions"].get("best_sam - best_sgd", {}).get("final")
        if v["cell"] in cells and decision is not None:
            rows.append(
                row(
                    f"{claim} ({v['cell']})",
                    source,
                    "best SAM - best SGD, test error at the final epoch, paired by seed",
                    _interval_text(decision),
                    judged(decision.outcome, "SAM better", decision.n),
                    f"confirmation runs, {decision.n} fresh seeds; {decision.where()}",
                )
            )
    return rows


def _interval_text(decision: Decision) -> str:
    d = decision.interval
    return f"{d.mean:+.3f} ({d.level:.1%} CI {d.low:+.3f} to {d.high:+.3f})"


def lowers_error(found: list[dict[str, Any]], scenarios: dict[str, tuple[str, float]]) -> list[dict]:
    """SAM lowers test error against SGD: one row per label-noise cell (the cell's verdict)."""
    cells = {c for c, (scenario, _) in scenarios.items() if scenario != "finetune"} or {v["cell"] for v in found}
    cells -= {c for c, (scenario, _) in scenarios.items() if scenario == "finetune"}
    rows = _per_cell(found, cells, "SAM lowers test error against SGD", "Tables 1 and 4")
    if rows:
        return rows
    return [
        row(
            "SAM lowers test error against SGD",
            "Tables 1 and 4",
            "best SAM - best SGD, paired by seed",
            "-",
            "not tested",
            "needs a confirmation stage (confirm_seeds >= 3) for a training-from-scratch cell",
        )
    ]


def finetuning(found: list[dict[str, Any]], scenarios: dict[str, tuple[str, float]]) -> list[dict]:
    """SAM lowers test error against SGD when finetuning: one row per finetuning cell."""
    cells = {c for c, (scenario, _) in scenarios.items() if scenario == "finetune"}
    rows = _per_cell(found, cells, "SAM lowers test error when finetuning", "Table 3")
    if rows:
        return rows
    return [
        row(
            "SAM lowers test error when finetuning",
            "Table 3",
            "best SAM - best SGD in finetuning cells, paired by seed",
            "-",
            "not tested",
            "needs a finetuning sweep (scenario=finetune) with a confirmation stage",
        )
    ]


#: What stands for "SAM at rho = 0.05", best first: the rho ablation's point (the best SAM
#: configuration with rho alone moved), else the SAM baseline (the paper's whole default).
DEFAULTS = (
    ("rho=0.05", "SAM at rho 0.05, the best SAM's other settings", "rho = 0.05 is as good as the searched rho"),
    (
        "sam_baseline",
        "the SAM baseline (the paper's default settings)",
        "the paper's SAM default is as good as the searched SAM",
    ),
)


#: Why the row against best SAM and the rho curve's robust range share one rule.
SAME_RULE = (
    "the rho curve's robust range uses this decision: no worse than the best SAM by more than the "
    "margin, on the verdicts' interval"
)


def robust_default(found: list[dict[str, Any]], aliases: dict[str, str]) -> list[dict]:
    """rho = 0.05 is a robust default: per cell, SAM at rho 0.05 (the rho ablation's point where
    the cell has one, else the SAM baseline) against best SAM (holds when no worse than it by
    more than the margin: `samtune.verdicts.against_optimum`, the rule of the rho curve's robust
    range) and against best SGD (holds when lower), paired by seed."""
    rows = []
    for v in found:
        decisions = v["decisions"]
        first, what, as_good = next((d for d in DEFAULTS if f"{d[0]} - best_sgd" in decisions), DEFAULTS[-1])
        same = f"{first}:best_sam" in aliases.get(v["cell"], "")
        for other, holds, claim in (
            ("best_sam", "no worse", as_good),
            ("best_sgd", "SAM better", "rho = 0.05 beats SGD"),
        ):
            d = decisions.get(f"{first} - {other}", {}).get("final")
            if d is None:
                continue
            verdict = judged(d.outcome, holds, d.n)
            basis = f"confirmation runs, {d.n} fresh seeds; {d.where()}"
            if other == "best_sam" and first == "rho=0.05":
                basis += f"; {SAME_RULE}"
            if same and other == "best_sam":
                # The optimum of its own curve: robust there by definition, so here too.
                verdict = "holds"
                basis = "the search picked rho = 0.05 itself: one set of confirmation runs stands for both"
            rows.append(
                row(
                    f"{claim} ({v['cell']})",
                    "Section 3 (rho = 0.05 untuned)",
                    f"{what} - {other.replace('_', ' ')}, test error at the final epoch, paired by seed",
                    _interval_text(d),
                    verdict,
                    basis,
                )
            )
    return rows or [
        row(
            "rho = 0.05 is a robust default",
            "Section 3 (rho = 0.05 untuned)",
            "SAM baseline (rho 0.05) against best SAM and best SGD, paired by seed",
            "-",
            "not tested",
            "needs the confirmation stage's sam_baseline runs (confirm_seeds >= 3)",
        )
    ]


def flatter_minima(runs: Runs) -> list[dict]:
    """SAM finds flatter minima: per measure and cell, log10(SAM / SGD) of the confirmed picks'
    Hessian, paired by seed and judged by the verdicts' sequential rule (holds where the interval
    lies below 0). A sweep whose confirmation runs measured no Hessian falls back to its picked
    search trials, one per cell, the cells as the replicates (`searched_flatness`)."""
    rows = confirmed_flatness(runs)
    return rows or searched_flatness(runs) or [FLATNESS_NOT_TESTED]


FLATNESS_NOT_TESTED = row(
    "SAM finds flatter minima (lambda_max, lambda_max / lambda_5)",
    FLATNESS_SOURCE,
    "the Hessian's top eigenvalue and its spread, SAM against SGD",
    "-",
    "not tested",
    "needs a Hessian measure among sharpness_measures (hessian_top_eig) and ablation_rates naming the "
    "cells whose best SGD and best SAM confirmation runs measure it",
)


def _by_seed(part: pd.DataFrame, pick: str, column: str) -> dict[int, float]:
    """log10 of a pick's positive ``column`` by seed."""
    rows = part[part["confirms"] == pick]
    return {int(r.seed): math.log10(v) for r, v in zip(rows.itertuples(), rows[column]) if v > 0}


def confirmed_flatness(runs: Runs) -> list[dict]:
    """The flatness rows of the cells whose best SGD and best SAM confirmation runs measured the
    Hessian (`samtune.sweep.flatness`), one per measure and cell."""
    frame = runs.confirmations
    if frame.empty:
        return []
    rows = []
    finished = frame[(frame["status"] == "finished") & frame["confirms"].isin(["best_sgd", "best_sam"])]
    for cell, part in finished.groupby("cell", sort=False):
        residual = pd.to_numeric(part["sharpness/hessian_top_eig/residual"], errors="coerce")
        bound = float((residual / pd.to_numeric(part["sharpness/hessian_top_eig"], errors="coerce")).max())
        bounded = f"; Lanczos residual bound at most {bound:.1%} of lambda_max" if math.isfinite(bound) else ""
        for name, column in FLATNESS.items():
            diffs = paired(_by_seed(part, "best_sam", column), _by_seed(part, "best_sgd", column))
            if not diffs:
                continue
            design = runs.design or Design(looks=(len(diffs),))
            decision = decide(diffs, Design(design.looks, design.alpha, 0.0), compared="log10 SAM / SGD")
            d = decision.interval
            ratio = f"x{10**d.mean:.2f}" + (f" (x{10**d.low:.2f} to x{10**d.high:.2f})" if d.n > 1 else "")
            rows.append(
                row(
                    f"SAM finds flatter minima ({name}, {cell})",
                    FLATNESS_SOURCE,
                    f"log10({name} of best SAM / of best SGD), the training loss's Hessian by Lanczos, paired by seed",
                    f"{_interval_text(decision)}; SAM's is {ratio} SGD's",
                    judged(decision.outcome, "SAM better", decision.n),
                    f"confirmation runs, {decision.n} fresh seeds; {decision.where()}{bounded}",
                )
            )
    return rows


def searched_flatness(runs: Runs) -> list[dict]:
    """Per measure, the log10 ratio SAM / SGD of the picked search trials' values, one per cell,
    with a t interval over cells (holds where it is below 0)."""
    pool = runs.plotted[runs.plotted["status"] == "finished"] if not runs.plotted.empty else runs.plotted
    present = {name: col for name, col in FLATNESS.items() if col in pool}
    rows = []
    if present:
        chosen_by, _ = choice_metric(pool, "final_val_error")
        best = best_per_optimizer(pool, chosen_by, report=list(present.values()), prefer=runs.picked)
    for name, col in present.items():
        ratios = []
        for _, group in best.groupby("cell", sort=False):
            by = dict(zip(group["optimizer_label"], group[f"{col}_mean"]))
            sam, sgd = by.get("SAM", math.nan), by.get("SGD", math.nan)
            if sam > 0 and sgd > 0:
                ratios.append(math.log10(sam / sgd))
        est = mean_interval(ratios)
        outcome = outcome_of(Estimate(est.mean, est.low, est.high, est.n, est.sd), margin=0.0)
        rows.append(
            row(
                f"SAM finds flatter minima ({name})",
                FLATNESS_SOURCE,
                f"log10({name} of SAM / {name} of SGD), the Hessian's by Lanczos, per cell",
                est.text() if est.n else "-",
                judged(outcome, "SAM better", est.n, "cells") if est.n else "not tested",
                f"search trials the sweep picked: one run per configuration and cell, {est.n} cells as "
                "the replicates (no confirmation run measured the Hessian)",
            )
        )
    return rows


def m_columns(trials: pd.DataFrame) -> dict[int, str]:
    """The column of m-sharpness at each m the trials logged, by m ascending: every
    ``sharpness/m_sharpness_at_m<m>`` (the measure's ``ms``), and ``sharpness/m_sharpness`` at the
    measure's own m where every trial measured it at the same one (its ``sharpness/m_sharpness/m``).

    >>> m_columns(pd.DataFrame({"sharpness/m_sharpness_at_m8": [0.1], "sharpness/m_sharpness": [0.2],
    ...                         "sharpness/m_sharpness/m": [128.0]}))
    {8: 'sharpness/m_sharpness_at_m8', 128: 'sharpness/m_sharpness'}
    """
    found = {int(m.group(1)): str(col) for col in trials.columns if (m := AT_M.match(str(col)))}
    own, setting = "sharpness/m_sharpness", "sharpness/m_sharpness/m"
    if found and own in trials and setting in trials:
        ms = pd.to_numeric(trials[setting], errors="coerce").dropna().unique()
        if len(ms) == 1 and int(ms[0]) not in found:
            found[int(ms[0])] = own
    return dict(sorted(found.items()))


def tau_per_m(trials: pd.DataFrame, target: str = GAP) -> dict[int, TauInterval]:
    """Kendall's tau between m-sharpness at each logged m (`m_columns`) and ``target`` over
    ``trials``, with its bootstrap interval, by m ascending."""
    if target not in trials:
        return {}
    y = pd.to_numeric(trials[target], errors="coerce").to_numpy(float)
    return {
        m: kendall_tau_interval(pd.to_numeric(trials[col], errors="coerce").to_numpy(float), y)
        for m, col in m_columns(trials).items()
    }


def smaller_m_predicts(runs: Runs) -> list[dict]:
    """Smaller m predicts generalization better: tau(smallest m) - tau(largest m) against the
    generalization gap, over the plotted search trials, with a bootstrap interval."""
    trials = runs.plotted
    taus = tau_per_m(trials)
    if len(taus) < 2:
        return [
            row(
                "smaller m predicts generalization better",
                "Section 4.2 (m-sharpness)",
                "Kendall's tau of m-sharpness against the generalization gap, per m",
                "-",
                "not tested",
                "needs m-sharpness at two or more m (sharpness_settings {'m_sharpness': {'ms': [8, 32, 128]}}) "
                "and a logged generalization gap",
            )
        ]
    small, large = min(taus), max(taus)
    y = pd.to_numeric(trials[GAP], errors="coerce").to_numpy(float)
    column = {m: pd.to_numeric(trials[col], errors="coerce").to_numpy(float) for m, col in m_columns(trials).items()}
    diff = tau_difference(column[small], column[large], y)
    outcome = "undecided" if diff.covers_zero else ("SAM better" if diff.low > 0 else "SGD better")
    measured = "; ".join(f"m={m}: {t.text()}" for m, t in taus.items())
    return [
        row(
            "smaller m predicts generalization better",
            "Section 4.2 (m-sharpness)",
            f"tau(m={small}) - tau(m={large}) of m-sharpness against the generalization gap",
            f"{diff.text().replace('tau = ', 'difference ', 1)}; {measured}",
            judged(outcome, "SAM better", diff.n, "trials"),
            f"every plotted search trial that logged both ({diff.n}); 95% bootstrap over trials",
        )
    ]


def gain_with_noise(found: list[dict[str, Any]], scenarios: dict[str, tuple[str, float]]) -> list[dict]:
    """SAM's gain grows with the noise rate: the least-squares slope of the per-cell mean gain
    (SGD - SAM, paired by seed) over the cells' noise rates, with `slope_interval`'s interval (a
    gain that rises then falls is no trend, however well each cell's gain is known)."""
    gains, rates = [], []
    for v in found:
        scenario, rate = scenarios.get(v["cell"], ("label_noise", math.nan))
        values = v.get("seed_values", {})
        if scenario == "label_noise" and math.isfinite(rate) and {"best_sgd", "best_sam"} <= set(values):
            gains.append(
                list(paired(values["best_sgd"].get("final", {}), values["best_sam"].get("final", {})).values())
            )
            rates.append(rate)
    if len(set(rates)) < 2:
        return [
            row(
                "SAM's gain grows with the label-noise rate",
                "Table 4",
                "slope of (SGD - SAM test error) over the noise rate",
                "-",
                "not tested",
                "needs confirmation runs in label-noise cells at two or more noise rates",
            )
        ]
    est = slope_interval(rates, gains)
    outcome = outcome_of(Estimate(-est.mean, -est.high, -est.low, est.n, est.sd), margin=0.0)
    return [
        row(
            "SAM's gain grows with the label-noise rate",
            "Table 4",
            "slope of the gain (SGD - SAM test error, final epoch, paired by seed) per unit noise rate",
            est.text(),
            judged(outcome, "SAM better", len(rates), "cells"),
            f"confirmation runs in {len(rates)} cells (noise {', '.join(f'{x:g}' for x in rates)}), "
            f"at least {est.n} seeds each; 95% t interval, the wider of the seeds' (Welch-Satterthwaite) "
            "and the residuals' about the line",
        )
    ]


NOT_TESTED = [
    row(
        "SAM lowers ImageNet error",
        "Table 2",
        "SAM against SGD on ImageNet",
        "-",
        "not tested",
        "needs an ImageNet sweep (the sweep's datasets are local, smaller ones)",
    ),
]


def claims(runs: Runs) -> pd.DataFrame:
    """The claims table of a sweep's runs (module docstring), one row per claim and cell."""
    found = verdicts(runs)
    scenarios = _scenarios(runs)
    rows = lowers_error(found, scenarios)
    rows += robust_default(found, runs.aliases)
    rows += flatter_minima(runs)
    rows += smaller_m_predicts(runs)
    rows += gain_with_noise(found, scenarios)
    rows += finetuning(found, scenarios)
    rows += NOT_TESTED
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown(table: pd.DataFrame, columns: list[str] = COLUMNS) -> str:
    """The claims table as markdown (``columns`` of it)."""
    if table.empty:
        return ""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(str(r[c]).replace("|", "\\|") for c in columns) + " |" for r in table.to_dict("records")
    ]
    return "\n".join(lines) + "\n"


#: Where the claims section of the sweep run's description starts (all that follows is its own).
CLAIMS_HEADING = "**The SAM paper's claims**"
#: What the description shows of each claim: what the claims view shows of it.
DESCRIPTION_COLUMNS = ["claim", "measured", "verdict"]
#: MLflow's limit on a tag's value (``mlflow.utils.validation.MAX_TAG_VAL_LENGTH``).
TAG_LIMIT = 8000


def with_claims(description: str, table: pd.DataFrame, limit: int = TAG_LIMIT) -> str:
    """The sweep run's description (the verdict table) with its claims section: the earlier one,
    if any, replaced by ``table``'s, one row per claim (claim, measured, verdict, as the claims view
    shows them); rows that would take it past ``limit`` characters are left to the report, and
    a line says how many.

    >>> table = pd.DataFrame([row("c", "s", "x", "+0.1", "holds", "b")], columns=COLUMNS)
    >>> print(with_claims("verdicts", table))
    verdicts
    <BLANKLINE>
    **The SAM paper's claims** (Foret et al. 2020), each with its measured value and verdict (the report's claims view says what is compared and on which runs):
    <BLANKLINE>
    | claim | measured | verdict |
    |---|---|---|
    | c | +0.1 | holds |
    <BLANKLINE>
    >>> with_claims(with_claims("verdicts", table), table) == with_claims("verdicts", table)
    True
    """
    kept = description.split(CLAIMS_HEADING)[0].rstrip()
    head = (
        f"{CLAIMS_HEADING} (Foret et al. 2020), each with its measured value and verdict (the report's "
        "claims view says what is compared and on which runs):\n\n"
    )
    start = f"{kept}\n\n{head}" if kept else head
    rows = len(table)
    while True:
        shown = markdown(table.head(rows), DESCRIPTION_COLUMNS)
        left = len(table) - rows
        more = f"\n{left} more claim rows in the report's claims view\n" if left else ""
        if len(start) + len(shown) + len(more) <= limit or rows == 0:
            return start + shown + more
        rows -= 1

"""Verdicts that decide: seeds added in rounds until SAM against SGD is settled, at an error rate
that looking after every round does not inflate.

A cell's confirmed SAM and SGD configurations run on the same fresh seeds; each seed gives one
paired difference d = SAM's test error - SGD's. After each round (a *look*, at ``n_1 < n_2 < ...``
seeds), each selection rule of each cell gets one of four decisions from the interval of the mean
of d at that look:

- ``SAM better`` / ``SGD better``: the interval excludes 0;
- ``equivalent``: it lies inside [-margin, +margin] (a positive statement, not "no difference
  detected");
- ``undecided``: neither (or fewer than `MIN_SEEDS` seeds); the cell gets the next round's
  seeds, or, after the last look, the row says "undecided at n seeds".

A value against an optimum it was moved from (an ablation's point against its pick, rho = 0.05
against the searched rho) asks a one-sided question of the same interval and margin
(`no_worse`): ``no worse`` where the interval's upper end is at most +margin, ``worse`` where its
lower end is above +margin, else ``undecided``. Being better than the optimum by more than the
margin is no failure there, and a value worse by less than the margin is as good as it.

A row keeps the decision of the first look that decides it. Validity under that optional stopping
comes from spending the error rate over the looks (a group-sequential design with a Bonferroni
spending function): look j uses a Student-t interval at level ``1 - alpha_j`` with the alphas
summing to ``alpha``, so with probability at least ``1 - alpha`` every interval of every look
covers the true mean difference at once, and hence so does the one a decision used, whichever
look that was. Spending is in proportion to each look's seeds: little at the first, small look,
where a t interval on 2 degrees of freedom is wide anyway. The t interval is exact for normal
per-seed noise; the union bound's slack covers the heavy-tailed noise the simulation test tries.

>>> design = Design(looks=(3, 6, 10), alpha=0.05, margin=0.01)
>>> [round(a, 4) for a in design.alphas]
[0.0079, 0.0158, 0.0263]
>>> d = decide({s: 0.05 + 0.01 * (-1) ** s for s in range(1, 11)}, design)
>>> d.outcome, d.n, d.look
('SGD better', 6, 1)
>>> decide({s: 0.001 * (-1) ** s for s in range(1, 11)}, design).outcome
'equivalent'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from samtune.stats import Estimate, mean_interval

ALPHA = 0.05
#: Fewer paired seeds than this decide nothing: a t interval on one degree of freedom, over test
#: errors that come in steps of one example, can be zero-wide (two seeds that both differ by
#: exactly one example "decide" at any level).
MIN_SEEDS = 3
OUTCOMES = ("SAM better", "SGD better", "equivalent", "undecided")
#: What `no_worse` decides of a value against the optimum it was moved from.
NO_WORSE_OUTCOMES = ("no worse", "worse", "undecided")


def looks_between(first: int, last: int) -> tuple[int, ...]:
    """The seeds at each look from ``first`` to ``last``: steps of ``first``, the last step
    stretched rather than a short one added (3 to 10: 3, 6, 10; 2 to 10: 2, 4, 6, 8, 10).

    >>> looks_between(3, 10), looks_between(2, 10), looks_between(3, 3), looks_between(5, 7)
    ((3, 6, 10), (2, 4, 6, 8, 10), (3,), (5, 7))
    """
    if last <= first:
        return (first,)
    looks = list(range(first, last, first))
    if len(looks) > 1 and last - looks[-1] < first:
        looks.pop()
    return tuple(looks) + (last,)


@dataclass(frozen=True)
class Design:
    """The seeds at each look, the error rate spent over them, and the equivalence margin."""

    looks: tuple[int, ...]
    alpha: float = ALPHA
    margin: float = 0.01

    @property
    def alphas(self) -> list[float]:
        """The error rate each look spends, in proportion to its seeds; they sum to `alpha`."""
        total = sum(self.looks)
        return [self.alpha * n / total for n in self.looks]

    def text(self) -> str:
        return (
            f"seeds added in rounds ({', '.join(map(str, self.looks))}) until decided; "
            f"{1 - self.alpha:.0%} overall, spent over the looks; equivalence within +/-{self.margin:g}"
        )


@dataclass(frozen=True)
class Decision:
    """What a row's paired differences decide: the outcome, at which look (0-based) and seeds,
    and the interval that decided it (level ``1 - alpha`` of that look)."""

    outcome: str
    interval: Estimate
    look: int
    n: int
    design: Design
    #: What the differences are of, as the text names them.
    compared: str = "SAM - SGD"

    def text(self) -> str:
        """The verdict in words, with the interval the decision used."""
        diff, digits = self.interval, 3
        if diff.n < 2 or math.isnan(diff.low):
            return f"not enough seeds for a verdict ({diff.n})"
        ci = f"{diff.level:.1%} CI {diff.low:+.{digits}f} to {diff.high:+.{digits}f}"
        shown = f"{self.compared} = {diff.mean:+.{digits}f}, {ci}"
        if self.outcome in ("SAM better", "SGD better"):
            return f"{self.outcome}: lower by {abs(diff.mean):.{digits}f} ({ci})"
        if self.outcome == "equivalent":
            return f"equivalent within +/-{self.design.margin:g} ({shown})"
        if self.outcome in ("no worse", "worse"):
            return f"{self.outcome} than the optimum by more than +{self.design.margin:g} ({shown})"
        return f"undecided at {self.n} seeds ({shown})"

    def where(self) -> str:
        """Which look decided it (or was the last), and the level of the interval it used."""
        return f"look {self.look + 1} of {len(self.design.looks)}, {self.interval.level:.1%} interval"


def outcome_of(interval: Estimate, margin: float) -> str:
    """The decision an interval for SAM - SGD supports (errors: lower is better)."""
    if interval.n < MIN_SEEDS or math.isnan(interval.low):
        return "undecided"
    if interval.high < 0:
        return "SAM better"
    if interval.low > 0:
        return "SGD better"
    if -margin <= interval.low and interval.high <= margin:
        return "equivalent"
    return "undecided"


def no_worse(interval: Estimate, margin: float) -> str:
    """What an interval for a value minus the optimum it was moved from decides (errors: lower is
    better): "no worse" (upper end within +margin), "worse" (lower end above +margin) or
    "undecided" (neither, or fewer than `MIN_SEEDS` seeds).

    >>> from samtune.stats import mean_interval
    >>> no_worse(mean_interval([0.004, 0.005, 0.003]), 0.01), no_worse(mean_interval([0.2, 0.21, 0.22]), 0.01)
    ('no worse', 'worse')
    """
    if interval.n < MIN_SEEDS or math.isnan(interval.low):
        return "undecided"
    if interval.high <= margin:
        return "no worse"
    if interval.low > margin:
        return "worse"
    return "undecided"


def decide(
    differences: Mapping[int, float],
    design: Design,
    seeds: Sequence[int] | None = None,
    judge: Callable[[Estimate, float], str] = outcome_of,
    compared: str = "SAM - SGD",
) -> Decision:
    """The decision on one row from its paired differences by seed.

    ``seeds``: the confirmation seeds in the order they were added (default: sorted); look j
    sees the differences of the first ``looks[j]`` of them that the row has (a run that failed
    leaves its seed out). The first look that decides wins; with none, the last look's interval,
    undecided. ``judge``: what an interval decides (`outcome_of`, or `no_worse` for a value
    against its optimum); ``compared``: what the differences are of, for the text.
    """
    order = list(seeds) if seeds is not None else sorted(differences)
    decision = None
    for look, (n, alpha) in enumerate(zip(design.looks, design.alphas)):
        values = [differences[s] for s in order[:n] if s in differences]
        interval = mean_interval(values, level=1 - alpha)
        interval = Estimate(
            interval.mean, interval.low, interval.high, interval.n, interval.sd, interval.level, paired=True
        )
        decision = Decision(judge(interval, design.margin), interval, look, interval.n, design, compared)
        if decision.outcome != "undecided":
            return decision
        if len([s for s in order[n:] if s in differences]) == 0:
            break  # no later seeds have run (yet): this is as far as the row has got
    assert decision is not None
    return decision


def paired(first: Mapping[int, float], second: Mapping[int, float]) -> dict[int, float]:
    """``first - second`` for each seed both have."""
    return {s: first[s] - second[s] for s in first if s in second}

"""Means with confidence intervals over seeds, and the verdict a difference supports.

A confirmed configuration is run on a few seeds; its test error is given as the mean with a 95%
Student-t interval. SAM against SGD is the difference of their means, paired by seed where both
ran the same seeds (each seed's difference, then the t interval of those: the spread the seed
causes in both cancels), else Welch's interval. An interval that covers 0 supports no winner.

>>> est = mean_interval([0.10, 0.12, 0.11])
>>> round(est.mean, 3), round(est.low, 3), round(est.high, 3), est.n
(0.11, 0.085, 0.135, 3)
>>> verdict(difference({0: 0.05, 1: 0.06, 2: 0.05}, {0: 0.10, 1: 0.12, 2: 0.11}))
'SAM lower by 0.057 (95% CI 0.042 to 0.071)'
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from scipy import stats as _scipy_stats

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` runs with its confidence interval [low, high] at ``level``; the interval
    is NaN with fewer than 2 runs. ``paired`` says whether a difference was paired by seed."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    level: float = LEVEL
    paired: bool = False

    @property
    def covers_zero(self) -> bool:
        return not (self.low > 0 or self.high < 0)

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (1 seed: no interval)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _t(level: float, dof: float) -> float:
    return float(_scipy_stats.t.ppf(0.5 + level / 2, dof))


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """The mean of ``values`` and its Student-t interval (``level``, n - 1 degrees of freedom)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, math.nan, level)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, math.nan, math.nan, 1, math.nan, level)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t(level, n - 1) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, sd, level)


def difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Estimate:
    """``a - b`` for two configurations' results by seed: paired over the seeds both have (two or
    more), else Welch's interval for two independent means."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        est = mean_interval([a[s] - b[s] for s in shared], level)
        return Estimate(est.mean, est.low, est.high, est.n, est.sd, level, paired=True)
    ea, eb = mean_interval(list(a.values()), level), mean_interval(list(b.values()), level)
    mean = ea.mean - eb.mean
    if ea.n < 2 or eb.n < 2:
        return Estimate(mean, math.nan, math.nan, min(ea.n, eb.n), math.nan, level)
    va, vb = ea.sd ** 2 / ea.n, eb.sd ** 2 / eb.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Estimate(mean, mean, mean, min(ea.n, eb.n), 0.0, level)
    dof = (va + vb) ** 2 / (va ** 2 / (ea.n - 1) + vb ** 2 / (eb.n - 1))
    half = _t(level, dof) * se
    return Estimate(mean, mean - half, mean + half, min(ea.n, eb.n), se, level)


def verdict(diff: Estimate, first: str = "SAM", second: str = "SGD") -> str:
    """What a ``first - second`` difference of errors supports, in words."""
    if diff.n < 2 or math.isnan(diff.low):
        return f"not enough seeds for a verdict ({diff.n})"
    ci = f"{diff.level:.0%} CI {abs(diff.high if diff.mean < 0 else diff.low):.3f} to " \
         f"{abs(diff.low if diff.mean < 0 else diff.high):.3f}"
    if diff.covers_zero:
        return f"no detectable difference ({first} - {second} = {diff.mean:+.3f}, " \
               f"{diff.level:.0%} CI {diff.low:+.3f} to {diff.high:+.3f})"
    winner = first if diff.mean < 0 else second
    return f"{winner} lower by {abs(diff.mean):.3f} ({ci})"

"""Means with confidence intervals over seeds, and the verdict a difference supports.

A confirmed configuration is run on a few seeds; its test error is given as the mean with a 95%
Student-t interval. SAM against SGD is the difference of their means, paired by seed where both
ran the same seeds (each seed's difference, then the t interval of those: the spread the seed
causes in both cancels), else Welch's interval. What a difference decides is `samtune.sequential`'s.

How well a sharpness measure ranks trials by their error is Kendall's tau-b, with a percentile
bootstrap interval over trials (pairs of values resampled together); the granulated tau of Jiang
et al. 2019 (a mean of taus within groups of trials that differ in one hyperparameter) gets the
same interval, every group's tau recomputed on each resample of the trials.

>>> est = mean_interval([0.10, 0.12, 0.11])
>>> round(est.mean, 3), round(est.low, 3), round(est.high, 3), est.n
(0.11, 0.085, 0.135, 3)
>>> difference({0: 0.05, 1: 0.06, 2: 0.05}, {0: 0.10, 1: 0.12, 2: 0.11}).text()
'-0.057 [-0.071, -0.042]'
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

LEVEL = 0.95
#: Bootstrap resamples behind a tau's interval: the Monte Carlo error of its ends is then about
#: a tenth of the interval's width or less.
RESAMPLES = 2000
#: Fewer trials than this get a tau but no interval: a bootstrap of a handful of points mostly
#: resamples the same few pairs and would look more certain than they are.
MIN_TRIALS_FOR_INTERVAL = 5


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
    va, vb = ea.sd**2 / ea.n, eb.sd**2 / eb.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Estimate(mean, mean, mean, min(ea.n, eb.n), 0.0, level)
    dof = (va + vb) ** 2 / (va**2 / (ea.n - 1) + vb**2 / (eb.n - 1))
    half = _t(level, dof) * se
    return Estimate(mean, mean - half, mean + half, min(ea.n, eb.n), se, level)


# -- Kendall's tau with a bootstrap interval over trials ------------------------------------------


@dataclass(frozen=True)
class TauInterval:
    """Kendall's tau (or a mean of taus) over ``n`` trials with its bootstrap interval
    [low, high] at ``level``; the interval is NaN with too few trials for one."""

    tau: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def covers_zero(self) -> bool:
        """True where the interval does not tell the tau from 0 (and where there is none)."""
        return not self.has_interval or self.low <= 0.0 <= self.high

    def text(self, digits: int = 2) -> str:
        """``tau = 0.31 [0.05, 0.52] (n = 30)``, with ", not distinguishable from 0" where the
        interval covers 0, or why there is no interval."""
        if not math.isfinite(self.tau):
            return f"tau undefined (n = {self.n})"
        head = f"tau = {self.tau:.{digits}f}"
        if not self.has_interval:
            return f"{head} (n = {self.n}), too few trials for an interval"
        out = f"{head} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n = {self.n})"
        return out + (", not distinguishable from 0" if self.covers_zero else "")


def signs(values: np.ndarray) -> np.ndarray:
    """sign(v_i - v_j) for every ordered pair of trials: +1, -1, or 0 for a tie."""
    return np.sign(values[:, None] - values[None, :])


def weighted_taus(sx: np.ndarray, sy: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row of ``weights`` (how many times each trial is drawn), from the
    trials' sign matrices. Two copies of one trial tie on both sides, so they count in neither the
    numerator nor the denominator: the tau-b of the resampled points, as scipy computes it. NaN
    where a side has no untied pair."""

    def pair_sum(matrix: np.ndarray) -> np.ndarray:
        return ((weights @ matrix) * weights).sum(axis=1)

    concordance = pair_sum(sx * sy)
    untied = pair_sum(np.abs(sx)) * pair_sum(np.abs(sy))
    with np.errstate(invalid="ignore", divide="ignore"):
        taus = concordance / np.sqrt(untied)
    return np.where(untied > 0, taus, np.nan)


def _finite_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and y as float arrays with non-finite values set to 0, and the mask of finite pairs."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-d and of one length, got {xs.shape} and {ys.shape}")
    finite = np.isfinite(xs) & np.isfinite(ys)
    return np.where(finite, xs, 0.0), np.where(finite, ys, 0.0), finite


def _bootstrap_weights(members: np.ndarray, size: int, resamples: int, seed: int) -> np.ndarray:
    """Row 0: each member once (the estimate); then ``resamples`` rows of counts, ``members``
    drawn with replacement as many times as there are members (none below
    MIN_TRIALS_FOR_INTERVAL members: no interval is given there). Non-members weigh 0."""
    k = len(members)
    if k < MIN_TRIALS_FOR_INTERVAL:
        resamples = 0
    weights = np.zeros((resamples + 1, size))
    weights[0, members] = 1.0
    if resamples:
        rng = np.random.default_rng(seed)
        weights[1:, members] = rng.multinomial(k, np.full(k, 1.0 / k), size=resamples)
    return weights


def _interval(estimate: float, replicates: np.ndarray, n: int, confidence: float) -> TauInterval:
    """The percentile interval of the finite replicates; none where fewer than half of the
    resamples have a tau (resampling then mostly draws ties) or below MIN_TRIALS_FOR_INTERVAL."""
    finite = replicates[np.isfinite(replicates)]
    if not math.isfinite(estimate) or n < MIN_TRIALS_FOR_INTERVAL or len(finite) < max(1, len(replicates) // 2):
        return TauInterval(float(estimate), math.nan, math.nan, n, confidence)
    low, high = np.quantile(finite, [(1 - confidence) / 2, (1 + confidence) / 2])
    return TauInterval(float(estimate), float(low), float(high), n, confidence)


def kendall_tau_interval(
    x: Sequence[float], y: Sequence[float], *, confidence: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> TauInterval:
    """Kendall's tau-b between ``x`` and ``y`` (one pair per trial; pairs with a non-finite side
    dropped) and its percentile bootstrap interval: ``resamples`` draws of the trials with
    replacement, pairs kept together. NaN tau where either side is constant; no interval below
    MIN_TRIALS_FOR_INTERVAL trials.

    >>> est = kendall_tau_interval([1, 2, 3, 4, 5, 6, 7, 8], [1, 3, 2, 4, 6, 5, 8, 7])
    >>> round(est.tau, 3), est.n, est.low <= est.tau <= est.high, est.covers_zero
    (0.786, 8, True, False)
    >>> kendall_tau_interval([1, 2, 3], [3, 1, 2]).text()
    'tau = -0.33 (n = 3), too few trials for an interval'
    """
    xs, ys, finite = _finite_pairs(x, y)
    members = np.flatnonzero(finite)
    xs, ys = xs[members], ys[members]
    n = len(members)
    weights = _bootstrap_weights(np.arange(n), n, resamples, seed)
    taus = weighted_taus(signs(xs), signs(ys), weights)
    return _interval(taus[0], taus[1:], n, confidence)


@dataclass(frozen=True)
class GranulatedTau:
    """Jiang et al.'s granulated tau with bootstrap intervals over trials: ``by_hyperparameter``
    holds psi_h, the mean tau over groups of trials that differ in h alone, for each h with
    enough groups (``groups`` counts them); ``overall`` is the mean of those psi_h (NaN when no
    hyperparameter has enough groups)."""

    overall: TauInterval
    by_hyperparameter: dict[str, TauInterval]
    groups: dict[str, int]


def _level_codes(values: Sequence[Hashable]) -> np.ndarray:
    codes: dict[Hashable, int] = {}
    return np.array([codes.setdefault(v, len(codes)) for v in values], dtype=int)


def _group_taus(
    xs: np.ndarray, ys: np.ndarray, groups: Sequence[Sequence[int]], codes: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Each group's tau under each row of ``weights`` (one column per group); NaN where the
    trials drawn from the group take fewer than two values of the hyperparameter (``codes``),
    since the group then no longer varies it, or where the tau is undefined."""
    columns = [np.full(len(weights), np.nan)]
    for group in groups:
        rows = np.asarray(group, dtype=int)
        drawn = weights[:, rows]
        taus = weighted_taus(signs(xs[rows]), signs(ys[rows]), drawn)
        levels = codes[rows][:, None] == np.unique(codes[rows])[None, :]
        varied = ((drawn > 0).astype(float) @ levels).astype(bool).sum(axis=1) >= 2
        columns.append(np.where(varied, taus, np.nan))
    return np.column_stack(columns)[:, 1:]


def _mean_of_finite(values: np.ndarray) -> np.ndarray:
    """Row means over the finite entries; NaN for a row with none."""
    finite = np.isfinite(values)
    counts = finite.sum(axis=1)
    totals = np.where(finite, values, 0.0).sum(axis=1)
    return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def granulated_tau_interval(
    x: Sequence[float],
    y: Sequence[float],
    groups: Mapping[str, Sequence[Sequence[int]]],
    levels: Mapping[str, Sequence[Hashable]],
    *,
    min_groups: int = 2,
    confidence: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> GranulatedTau:
    """Jiang et al. 2019's granulated Kendall tau between ``x`` and ``y`` (one value per trial)
    with percentile bootstrap intervals over trials.

    ``groups[h]`` lists groups of trial positions that agree on everything but hyperparameter h,
    ``levels[h][i]`` is trial i's value of h. Trials with a non-finite x or y are dropped; a group
    counts where its trials still take two values of h and its tau is defined, and psi_h (the
    mean over counted groups) is given for h with at least ``min_groups`` of them. A resample
    draws, with replacement, from the trials of the counted groups, and recomputes every group's
    tau on the trials drawn (copies of one trial tie), psi_h and their mean.

    >>> x, y = [1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]
    >>> lr = [0.1, 0.3, 0.1, 0.3, 0.1, 0.3]
    >>> est = granulated_tau_interval(x, y, {"lr": [[0, 1], [2, 3], [4, 5]]}, {"lr": lr})
    >>> est.by_hyperparameter["lr"].tau, est.groups["lr"], est.overall.tau, est.overall.n
    (-1.0, 3, -1.0, 6)
    """
    xs, ys, finite = _finite_pairs(x, y)
    codes = {hp: _level_codes(levels[hp]) for hp in groups}
    counted = {}
    for hp, hp_groups in groups.items():
        taus = _group_taus(xs, ys, hp_groups, codes[hp], finite[None, :].astype(float))[0]
        kept = [np.asarray(g, dtype=int) for g, t in zip(hp_groups, taus) if np.isfinite(t)]
        if len(kept) >= min_groups:
            counted[hp] = [g[finite[g]] for g in kept]
    members = np.unique(np.concatenate([g for gs in counted.values() for g in gs] or [[]])).astype(int)
    weights = _bootstrap_weights(members, len(xs), resamples, seed)
    psi = {hp: _mean_of_finite(_group_taus(xs, ys, gs, codes[hp], weights)) for hp, gs in counted.items()}
    by_hp = {
        hp: _interval(values[0], values[1:], len(np.unique(np.concatenate(counted[hp]))), confidence)
        for hp, values in psi.items()
    }
    overall = np.mean(np.column_stack(list(psi.values())), axis=1) if psi else np.full(len(weights), np.nan)
    return GranulatedTau(
        _interval(overall[0], overall[1:], len(members), confidence), by_hp, {hp: len(gs) for hp, gs in counted.items()}
    )


def contrast_interval(groups: Sequence[Sequence[float]], coefs: Sequence[float], level: float = LEVEL) -> Estimate:
    """``sum_i c_i mean(groups[i])`` for independent groups, with its Student-t interval on the
    Welch-Satterthwaite degrees of freedom (e.g. a regression slope through the groups' means:
    ``c_i = (r_i - mean r) / sum (r_j - mean r)^2``). NaN interval where a group with a non-zero
    coefficient has fewer than 2 values; ``n`` is the smallest group.

    >>> est = contrast_interval([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [-1.0, 1.0])
    >>> est.mean, round(est.high - est.mean, 3), est.n
    (3.0, 2.267, 3)
    """
    means = [mean_interval(g, level) for g in groups]
    used = [(c, e) for c, e in zip(coefs, means) if c != 0]
    value = sum(c * e.mean for c, e in used)
    n = min((e.n for _, e in used), default=0)
    if n < 2:
        return Estimate(value, math.nan, math.nan, n, math.nan, level)
    parts = [(c * c * e.sd**2 / e.n, e.n - 1) for c, e in used]
    var = sum(v for v, _ in parts)
    if var == 0:
        return Estimate(value, value, value, n, 0.0, level)
    dof = var**2 / sum(v**2 / d for v, d in parts)
    half = _t(level, dof) * math.sqrt(var)
    return Estimate(value, value - half, value + half, n, math.sqrt(var), level)


def slope_interval(xs: Sequence[float], groups: Sequence[Sequence[float]], level: float = LEVEL) -> Estimate:
    """The least-squares slope of the groups' means over ``xs``, with the wider of two intervals:
    the seeds' (`contrast_interval`: how well each mean is known) and the regression's own
    (residuals about the line, ``len(xs) - 2`` degrees of freedom: how well a line fits). Means
    known exactly but far off any line give no trend to speak of; the first interval alone would
    call it one.

    >>> est = slope_interval([0.0, 1.0, 2.0], [[0.0, 0.1], [1.0, 1.1], [2.0, 2.1]])
    >>> round(float(est.mean), 6), round(float(est.high - est.mean), 3)  # on the line: the seeds decide
    (1.0, 0.152)
    >>> wide = slope_interval([0.0, 1.0, 2.0, 3.0], [[0.0, 0.01], [3.0, 3.01], [0.0, 0.01], [3.0, 3.01]])
    >>> round(float(wide.mean), 6), round(float(wide.high - wide.mean), 3)  # far off a line: the residuals decide
    (0.6, 3.651)
    """
    r = np.asarray([float(x) for x in xs])
    centred = r - r.mean()
    sxx = float((centred**2).sum())
    seeds = contrast_interval(groups, list(centred / sxx), level)
    if len(r) < 3 or not math.isfinite(seeds.low):
        return seeds
    means = np.asarray([mean_interval(g, level).mean for g in groups])
    residuals = means - means.mean() - seeds.mean * centred
    half = _t(level, len(r) - 2) * math.sqrt(float((residuals**2).sum()) / (len(r) - 2) / sxx)
    if half <= seeds.high - seeds.mean:
        return seeds
    return Estimate(seeds.mean, seeds.mean - half, seeds.mean + half, seeds.n, half / _t(level, len(r) - 2), level)


def tau_difference_interval(
    x1: Sequence[float],
    x2: Sequence[float],
    y: Sequence[float],
    *,
    confidence: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> TauInterval:
    """``tau(x1, y) - tau(x2, y)`` over the trials where all three are finite, with a percentile
    bootstrap interval from the same resamples of the trials for both taus (their correlation
    through the shared y cancels). None below MIN_TRIALS_FOR_INTERVAL trials.

    >>> d = tau_difference_interval([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6])
    >>> d.tau, d.n, d.low > 0
    (2.0, 6, True)
    """
    xs1, ys, finite = _finite_pairs(x1, y)
    xs2, _, finite2 = _finite_pairs(x2, y)
    members = np.flatnonzero(finite & finite2)
    n = len(members)
    weights = _bootstrap_weights(np.arange(n), n, resamples, seed)
    sy = signs(ys[members])
    diff = weighted_taus(signs(xs1[members]), sy, weights) - weighted_taus(signs(xs2[members]), sy, weights)
    return _interval(diff[0], diff[1:], n, confidence)

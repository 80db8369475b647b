"""Kendall's tau with a bootstrap interval over trials, and the report's sharpness view that
gives each tau with one.

References are independent of the code under test: scipy's `kendalltau` on explicitly
resampled points, `scipy.stats.bootstrap` with that statistic, a brute-force bootstrap of the
granulated tau written here with Python loops, and hand counts of concordant pairs.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter

import numpy as np
import pytest
from scipy.stats import bootstrap, kendalltau

from samtune.report.runs import TrialRecord
from samtune.report.table import tabulate
from samtune.report.views import discover_views
from samtune.stats import (
    MIN_TRIALS_FOR_INTERVAL,
    TauInterval,
    granulated_tau_interval,
    kendall_tau_interval,
    signs,
    weighted_taus,
)

TAU_TEXT = re.compile(r"tau = -?\d\.\d\d \[-?\d\.\d\d, -?\d\.\d\d\] \(n = \d+\)")


def correlated(n: int, slope: float, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = slope * x + rng.normal(size=n)
    if ties:  # a handful of distinct values on each side: tau-b's tie correction matters
        x, y = np.round(x), np.round(y * 2)
    return x, y


# -- the tau and its resamples -------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_tau_is_scipys_tau_b_on_the_finite_pairs(ties):
    x, y = correlated(30, 0.5, seed=1, ties=ties)
    x[3], y[7] = np.nan, np.inf
    keep = np.isfinite(x) & np.isfinite(y)
    est = kendall_tau_interval(x, y)
    assert est.n == 28
    assert est.tau == pytest.approx(kendalltau(x[keep], y[keep]).statistic, abs=1e-12)


def test_tau_by_hand():
    # 8 points, 3 adjacent swaps: 25 of 28 pairs concordant, 3 discordant.
    est = kendall_tau_interval([1, 2, 3, 4, 5, 6, 7, 8], [1, 3, 2, 4, 6, 5, 8, 7])
    assert est.tau == pytest.approx((25 - 3) / 28)
    # Tau-b with ties: x ties one pair, y none; 6 pairs, 4 concordant, 1 discordant.
    est = kendall_tau_interval([1, 1, 2, 3], [1, 2, 4, 3])
    assert est.tau == pytest.approx((4 - 1) / math.sqrt(5 * 6))


@pytest.mark.parametrize("ties", [False, True])
def test_each_resample_tau_is_scipys_tau_of_the_points_drawn(ties):
    x, y = correlated(25, 0.8, seed=2, ties=ties)
    rng = np.random.default_rng(5)
    draws = rng.integers(0, len(x), size=(40, len(x)))
    counts = np.stack([np.bincount(d, minlength=len(x)) for d in draws]).astype(float)
    taus = weighted_taus(signs(x), signs(y), counts)
    expected = [kendalltau(x[d], y[d]).statistic for d in draws]
    assert taus == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, slope, ties", [(40, 0.5, False), (30, 1.0, True)])
def test_interval_agrees_with_scipy_bootstrap(n, slope, ties):
    x, y = correlated(n, slope, seed=3, ties=ties)
    resamples = 4000
    ours = [kendall_tau_interval(x, y, resamples=resamples, seed=s) for s in range(10)]
    reference = bootstrap(
        (x, y),
        lambda a, b: kendalltau(a, b).statistic,
        paired=True,
        vectorized=False,
        method="percentile",
        n_resamples=resamples,
        confidence_level=0.95,
        random_state=np.random.default_rng(0),
    )
    ref = reference.confidence_interval
    for end, ref_end in (("low", ref.low), ("high", ref.high)):
        values = [getattr(e, end) for e in ours]
        # Monte Carlo error of one endpoint at this many resamples, from our seed-to-seed spread;
        # scipy's estimate has the same, the mean of ours a tenth of its variance.
        spread = statistics.stdev(values)
        assert 0 < spread < 0.02
        assert statistics.mean(values) == pytest.approx(ref_end, abs=4 * spread * math.sqrt(1.1))


def test_too_few_trials_for_an_interval():
    few = kendall_tau_interval([1, 2, 3, 4], [1, 3, 2, 4])
    assert MIN_TRIALS_FOR_INTERVAL == 5
    assert few.tau == pytest.approx((5 - 1) / 6) and math.isnan(few.low) and math.isnan(few.high)
    assert few.text() == "tau = 0.67 (n = 4), too few trials for an interval"
    enough = kendall_tau_interval([1, 2, 3, 4, 5], [1, 3, 2, 4, 5])
    assert enough.low <= enough.tau <= enough.high
    assert kendall_tau_interval([1, 1, 1, 1, 1], [1, 2, 3, 4, 5]).text() == "tau undefined (n = 5)"


def test_the_text_says_when_the_interval_covers_zero():
    assert TauInterval(0.31, 0.05, 0.52, 30).text() == "tau = 0.31 [0.05, 0.52] (n = 30)"
    assert TauInterval(0.31, 0.05, 0.52, 30).covers_zero is False
    for low in (-0.2, 0.0):
        est = TauInterval(0.1, low, 0.4, 12)
        assert est.covers_zero
        assert est.text() == f"tau = 0.10 [{low:.2f}, 0.40] (n = 12), not distinguishable from 0"


def test_a_perfect_ranking_has_a_zero_width_interval():
    est = kendall_tau_interval(range(10), [2 * v + 1 for v in range(10)])
    assert (est.tau, est.low, est.high) == (1.0, 1.0, 1.0)


# -- the granulated tau --------------------------------------------------------------------------


def test_granulated_tau_by_hand():
    # lr groups: {0, 1, 2} at rho=1 has pairs (0,1) +, (0,2) +, (1,2) - -> 1/3; {3, 4, 5} at
    # rho=2 all concordant -> 1. rho groups: one pair at each lr, signs -, -, + -> -1/3.
    x = [1.0, 2.0, 3.0, 1.5, 2.5, 3.5]
    y = [1.0, 3.0, 2.0, 0.0, 1.0, 3.0]
    lr = [0.1, 0.2, 0.3, 0.1, 0.2, 0.3]
    rho = [1, 1, 1, 2, 2, 2]
    groups = {"lr": [[0, 1, 2], [3, 4, 5]], "rho": [[0, 3], [1, 4], [2, 5]]}
    est = granulated_tau_interval(x, y, groups, {"lr": lr, "rho": rho}, resamples=200)
    assert est.by_hyperparameter["lr"].tau == pytest.approx((1 / 3 + 1) / 2)
    assert est.by_hyperparameter["rho"].tau == pytest.approx(-1 / 3)
    assert est.overall.tau == pytest.approx(((1 / 3 + 1) / 2 - 1 / 3) / 2)
    assert est.groups == {"lr": 2, "rho": 3} and est.overall.n == 6
    # With too few groups a hyperparameter does not count; a non-finite value drops its trial.
    x[0] = math.nan
    est = granulated_tau_interval(x, y, groups, {"lr": lr, "rho": rho}, min_groups=3)
    assert set(est.by_hyperparameter) == set() and math.isnan(est.overall.tau)
    est = granulated_tau_interval(x, y, groups, {"lr": lr, "rho": rho}, min_groups=2)
    # Left: lr groups {1, 2} (-1) and {3, 4, 5} (+1); rho pairs (1, 4) (-1) and (2, 5) (+1).
    assert est.groups == {"lr": 2, "rho": 2}
    assert est.by_hyperparameter["lr"].tau == pytest.approx(0.0)
    assert est.by_hyperparameter["rho"].tau == pytest.approx(0.0)


def _design(seed: int):
    """4 lr x 3 rho x 2 seeds; the measure and the error both move with lr, noisily."""
    rng = np.random.default_rng(seed)
    cells = [(lr, rho, s) for lr in range(4) for rho in range(3) for s in range(2)]
    lr = np.array([c[0] for c in cells])
    rho = np.array([c[1] for c in cells])
    x = lr + 0.5 * rho + rng.normal(scale=1.0, size=len(cells))
    y = 0.5 * lr - 0.3 * rho + rng.normal(scale=1.0, size=len(cells))
    groups = {"lr": [np.flatnonzero(rho == r) for r in range(3)], "rho": [np.flatnonzero(lr == v) for v in range(4)]}
    return x, y, groups, {"lr": lr, "rho": rho}


def _brute_granulated(x, y, groups, levels, drawn) -> float:
    """The granulated tau of the trials `drawn` (with repeats), one group at a time."""
    counts = Counter(drawn.tolist())
    psis = []
    for hp, hp_groups in groups.items():
        taus = []
        for group in hp_groups:
            rows = [i for i in group for _ in range(counts[i])]
            if len({levels[hp][i] for i in rows}) < 2:
                continue
            tau = kendalltau(x[rows], y[rows]).statistic
            if np.isfinite(tau):
                taus.append(tau)
        if not taus:
            return math.nan
        psis.append(statistics.mean(taus))
    return statistics.mean(psis)


def test_granulated_interval_agrees_with_a_brute_force_bootstrap():
    x, y, groups, levels = _design(seed=4)
    resamples = 1500
    ours = [granulated_tau_interval(x, y, groups, levels, resamples=resamples, seed=s).overall for s in range(8)]
    assert ours[0].tau == pytest.approx(_brute_granulated(x, y, groups, levels, np.arange(len(x))))
    rng = np.random.default_rng(11)
    replicates = np.array(
        [_brute_granulated(x, y, groups, levels, rng.integers(0, len(x), len(x))) for _ in range(resamples)]
    )
    replicates = replicates[np.isfinite(replicates)]
    ref_low, ref_high = np.quantile(replicates, [0.025, 0.975])
    for end, ref_end in (("low", ref_low), ("high", ref_high)):
        values = [getattr(e, end) for e in ours]
        spread = statistics.stdev(values)
        assert 0 < spread < 0.05
        assert statistics.mean(values) == pytest.approx(ref_end, abs=4 * spread * math.sqrt(1.125))


# -- the view ------------------------------------------------------------------------------------


def _record(i: int, noise: float, lr: float, rho: float, seed: int, value: float, error: float) -> TrialRecord:
    rng = np.random.default_rng(i)
    params = {
        "optimizer": "sam",
        "lr": str(lr),
        "rho": str(rho),
        "seed": str(seed),
        "label_noise_rate": str(noise),
        # How sharpness was measured differs by seed: not a hyperparameter to rank.
        "sharpness_settings": str({"m_sharpness": {"rho": 0.05 * (seed + 1)}}),
    }
    final = {
        "val_error": error,
        "test_error": error,
        "generalization_gap": error - 0.1,
        "sharpness/m_sharpness": value,
        # What a measurement logs beside its value: settings, cost, error estimate.
        "sharpness/m_sharpness/rho": 0.05 * (seed + 1),
        "sharpness/m_sharpness/products": float(rng.integers(10, 100)),
        "sharpness/m_sharpness/seconds": float(rng.uniform(1, 5)),
        "sharpness/m_sharpness/stderr": float(rng.uniform(0, 0.1)),
        "sharpness/m_sharpness/residual": float(rng.uniform(0, 0.1)),
        "sharpness/m_sharpness/skipped": float(rng.integers(0, 2)),
        "sharpness/m_sharpness/expected_s": float(rng.uniform(1, 5)),
        "sharpness/m_sharpness/left_s": float(rng.uniform(1, 5)),
        "sharpness/subset": 256.0,
        "sharpness/seed": 0.0,
    }
    history = {key: [(2, v)] for key, v in final.items()}
    history["test_error"] = [(1, error + 0.1), (2, error)]
    return TrialRecord(f"run{i}", params, {"samtune.status": "finished"}, history)


def _runs():
    rng = np.random.default_rng(0)
    records = []
    for lr in (0.03, 0.1, 0.3):
        for rho in (0.05, 0.1):
            for seed in (0, 1):
                value = 10 * lr + rho + rng.normal(scale=0.05)
                records.append(_record(len(records), 0.0, lr, rho, seed, value, 0.1 + lr + rng.normal(scale=0.05)))
    for k, lr in enumerate((0.03, 0.1, 0.3, 0.03)):  # a cell too small for an interval
        records.append(_record(len(records), 0.4, lr, 0.05, k, lr + 0.01 * k, 0.4 + lr))
    return tabulate("view", records)


def test_the_view_gives_every_tau_with_its_interval():
    runs = _runs()
    spec = next(s for s in discover_views() if s.name == "sharpness")
    assert "bootstrap" in spec.caption and "95%" in spec.caption and "over trials" in spec.caption
    view = spec.function(runs)
    tau = view.data["tau"]
    # Only sharpness/<measure> is a measure; what is logged beside it is not.
    assert runs.sharpness_measures == ["m_sharpness"] and set(tau["measure"]) == {"m_sharpness"}
    rows = tau.set_index(["target", "cell"])
    pooled = rows.loc[("test error", "all")]
    plotted = runs.plotted
    assert pooled["n"] == 16
    assert pooled["tau"] == pytest.approx(
        kendalltau(plotted["sharpness/m_sharpness"], plotted["final_test_error"]).statistic
    )
    assert pooled["low"] <= pooled["tau"] <= pooled["high"]
    assert TAU_TEXT.fullmatch(pooled["text"].removesuffix(", not distinguishable from 0"))
    small = rows.loc[("test error", "noise=0.4")]
    assert small["n"] == 4 and small["text"].endswith("too few trials for an interval")
    for _, row in tau.iterrows():
        if math.isfinite(row["low"]):
            covers = row["low"] <= 0 <= row["high"]
            assert row["text"].endswith("not distinguishable from 0") == covers
    assert any(pooled["text"] in note for note in view.notes)


def test_the_granulated_tau_varies_training_hyperparameters_only():
    runs = _runs()
    spec = next(s for s in discover_views() if s.name == "sharpness")
    data = spec.function(runs).data
    granulated = data["granulated"]
    # The seed and how sharpness was measured are no hyperparameters; the cost and error
    # estimates logged beside the measure never group trials.
    assert set(granulated["hyperparameter"]) == {"lr", "rho"}
    lr = granulated[(granulated["target"] == "test error") & (granulated["hyperparameter"] == "lr")]
    # noise=0: one lr group per (rho, measurement setting); noise=0.4 has none, as each of its
    # trials was measured with its own setting.
    assert lr["n_groups"].tolist() == [4]
    overall = data["granulated_overall"]
    row = overall[overall["target"] == "test error"].iloc[0]
    assert row["low"] <= row["granulated_tau"] <= row["high"]
    assert row["n_hyperparameters"] == 2

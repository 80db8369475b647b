"""Verdicts that decide, checked by simulation: cells with known effects, per-seed noise normal
and heavy-tailed, every decision made as the sweep makes it (a look after each round, the first
look that decides wins)."""

import math
import zlib

import numpy as np
import pytest

from samtune.sequential import Design, decide, looks_between, outcome_of, paired
from samtune.stats import Estimate
from samtune.sweep.study import Sweep

CELLS = 2000
DESIGN = Design(looks=(3, 6, 10), alpha=0.05, margin=0.01)


def noise(rng, kind: str, sd: float, size) -> np.ndarray:
    if kind == "normal":
        return rng.normal(0.0, sd, size)
    # Student t on 3 degrees of freedom (variance 3), scaled to the same sd: heavy tails.
    return rng.standard_t(3, size) * sd / math.sqrt(3)


def simulate(effect: float, sd: float, kind: str, seed: int) -> list:
    """One decision per simulated cell, its seeds' differences drawn up front (a round only
    reveals them: the rule decides which it looks at)."""
    rng = np.random.default_rng(seed)
    draws = effect + noise(rng, kind, sd, (CELLS, DESIGN.looks[-1]))
    return [decide({s + 1: float(d) for s, d in enumerate(row)}, DESIGN) for row in draws]


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize(
    "effect,sd", [(0.0, 0.03), (0.05, 0.03), (-0.05, 0.03), (0.0, 0.005), (0.02, 0.01), (0.01, 0.05)]
)
def test_the_interval_a_decision_used_covers_the_true_difference(kind, effect, sd):
    decisions = simulate(effect, sd, kind, seed=zlib.crc32(repr((kind, effect, sd)).encode()))
    covered = np.mean([d.interval.low <= effect <= d.interval.high for d in decisions])
    assert covered >= 0.95, covered


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("sd", [0.005, 0.03, 0.1])
def test_a_zero_effect_is_declared_a_winner_at_most_5_percent_of_the_time(kind, sd):
    decisions = simulate(0.0, sd, kind, seed=int(sd * 1000) + (kind == "heavy"))
    winners = np.mean([d.outcome in ("SAM better", "SGD better") for d in decisions])
    assert winners <= 0.05, winners


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_a_difference_beyond_the_margin_is_called_equivalent_at_most_5_percent_of_the_time(kind):
    decisions = simulate(0.012, 0.01, kind, seed=11 + (kind == "heavy"))
    assert np.mean([d.outcome == "equivalent" for d in decisions]) <= 0.05


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("effect", [0.05, -0.05])
def test_an_effect_of_005_is_decided_within_10_seeds_in_most_cells(kind, effect):
    decisions = simulate(effect, 0.03, kind, seed=21 + (kind == "heavy") + (effect > 0))
    right = "SGD better" if effect > 0 else "SAM better"
    decided = np.mean([d.outcome == right for d in decisions])
    assert decided >= 0.9, decided
    # And often early: the first two looks (3 and 6 seeds) settle a good share.
    assert np.mean([d.outcome == right and d.n <= 6 for d in decisions]) >= 0.5


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_no_difference_with_little_noise_is_decided_equivalent(kind):
    decisions = simulate(0.0, 0.005, kind, seed=31 + (kind == "heavy"))
    assert np.mean([d.outcome == "equivalent" for d in decisions]) >= 0.9


def test_the_error_rate_is_spent_over_the_looks():
    assert sum(DESIGN.alphas) == pytest.approx(0.05)
    assert DESIGN.alphas == sorted(DESIGN.alphas)  # little at the small first look
    assert looks_between(3, 10) == (3, 6, 10) and looks_between(4, 4) == (4,)


def test_a_row_keeps_the_decision_of_the_first_look_that_decides():
    """Seeds 1-3 decide (SAM better); later seeds, run for the cell's other row, pointing the
    other way do not undo it."""
    values = {1: -0.10, 2: -0.101, 3: -0.099, **{s: 0.2 for s in range(4, 11)}}
    d = decide(values, DESIGN)
    assert (d.outcome, d.n, d.look) == ("SAM better", 3, 0)


def test_a_row_still_running_is_undecided_at_the_seeds_it_has():
    d = decide({1: 0.01, 2: -0.02, 3: 0.03}, DESIGN)
    assert (d.outcome, d.n, d.look) == ("undecided", 3, 0)
    assert "undecided at 3 seeds" in d.text()


def test_outcomes_against_the_interval():
    def est(low, high):
        return Estimate((low + high) / 2, low, high, 5, 0.01)

    assert outcome_of(est(-0.03, -0.001), 0.01) == "SAM better"
    assert outcome_of(est(0.001, 0.03), 0.01) == "SGD better"
    assert outcome_of(est(-0.009, 0.009), 0.01) == "equivalent"
    assert outcome_of(est(-0.02, 0.009), 0.01) == "undecided"
    # Two seeds that differ by exactly one test example each: a zero-wide interval decides nothing.
    assert outcome_of(Estimate(0.003, 0.003, 0.003, 2, 0.0), 0.01) == "undecided"
    assert paired({1: 0.5, 2: 0.4, 3: 0.1}, {1: 0.25, 3: 0.2}) == {1: 0.25, 3: pytest.approx(-0.1)}


def test_a_sweep_states_its_design_and_refuses_a_maximum_below_its_first_round():
    from samtune.contract.values import SpaceError

    sweep = Sweep(
        name="d",
        dataset="digits",
        model="cnn",
        epochs=2,
        batch_size=32,
        trials=2,
        confirm_seeds=3,
        max_confirm_seeds=10,
        equivalence_margin=0.02,
    )
    assert sweep.design() == Design(looks=(3, 6, 10), margin=0.02)
    assert sweep.replace(max_confirm_seeds=None).design().looks == (3,)
    with pytest.raises(SpaceError, match="max_confirm_seeds=2 is below confirm_seeds=3"):
        sweep.replace(max_confirm_seeds=2)

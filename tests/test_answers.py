"""Turning a search into an answer: declared baselines, the confirmation runs a cell gets, and the
intervals and verdicts on them, checked against scipy and a bootstrap."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as scipy_stats

from samtune.contract.values import SpaceError
from samtune.stats import difference, mean_interval
from samtune.sweep.baselines import baseline_trials
from samtune.sweep.confirm import reruns, seed_values
from samtune.sweep.results import CellResult, TrialRow
from samtune.sweep.search import CellSearch
from samtune.sweep.study import Sweep
from samtune.verdicts import cell_verdict, markdown, verdict_rows


def sweep(**changes):
    return Sweep(
        **{
            "name": "t",
            "dataset": "digits",
            "model": "cnn",
            "epochs": 2,
            "batch_size": 64,
            "trials": 4,
            "label_noise_rates": (0.0, 0.4),
            **changes,
        }
    )


def space(trial):
    if trial.suggest_categorical("optimizer", ["sgd", "sam"]) == "sam":
        trial.suggest_float("rho", 0.01, 0.5, log=True)
        trial.suggest_categorical("m", [8, 16, None])
    trial.suggest_float("lr", 0.01, 0.5, log=True)
    return {"weight_decay": 5e-4}


BOTH = [{"optimizer": "sgd"}, {"optimizer": "sam"}]

# ------------------------------------------------------------------------------ intervals


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_the_mean_interval_is_scipys_student_t_interval(n):
    rng = random.Random(n)
    xs = [rng.gauss(0.3, 0.05) for _ in range(n)]
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=np.mean(xs), scale=scipy_stats.sem(xs))
    est = mean_interval(xs)
    assert est.n == n and est.mean == pytest.approx(np.mean(xs))
    assert (est.low, est.high) == (pytest.approx(low), pytest.approx(high))


def test_the_paired_difference_is_scipys_paired_t_interval():
    rng = random.Random(1)
    seeds = range(6)
    sgd = {s: 0.3 + rng.gauss(0, 0.05) for s in seeds}
    sam = {s: sgd[s] - 0.02 + rng.gauss(0, 0.005) for s in seeds}  # shares each seed's luck
    expected = scipy_stats.ttest_rel([sam[s] for s in seeds], [sgd[s] for s in seeds]).confidence_interval(0.95)
    est = difference(sam, sgd)
    assert est.paired and (est.low, est.high) == (pytest.approx(expected.low), pytest.approx(expected.high))
    # Pairing removes the seed's spread: the unpaired (Welch) interval is far wider and covers 0.
    unpaired = difference({s + 100: v for s, v in sam.items()}, sgd)
    welch = scipy_stats.ttest_ind(list(sam.values()), list(sgd.values()), equal_var=False).confidence_interval(0.95)
    assert not unpaired.paired and (unpaired.low, unpaired.high) == (
        pytest.approx(welch.low),
        pytest.approx(welch.high),
    )
    assert not est.covers_zero and unpaired.covers_zero


def test_the_t_interval_agrees_with_a_bootstrap_on_many_seeds():
    rng = np.random.default_rng(0)
    xs = rng.normal(0.2, 0.03, size=40)
    boot = scipy_stats.bootstrap(
        (xs,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile", random_state=1
    ).confidence_interval
    est = mean_interval(list(xs))
    assert est.low == pytest.approx(boot.low, abs=0.003) and est.high == pytest.approx(boot.high, abs=0.003)


def test_one_seed_gives_a_mean_without_an_interval():
    assert "1 seed" in mean_interval([0.1]).text() and math.isnan(mean_interval([0.1]).low)


# ------------------------------------------------------------------------------ baselines


def test_baselines_are_declared_not_sampled_and_fill_searched_settings_with_defaults():
    sgd, sam = baseline_trials(sweep(), space, BOTH)
    assert (sgd.name, sgd.point) == ("sgd", {"optimizer": "sgd", "lr": 0.05})
    assert (sam.name, sam.point) == ("sam_baseline", {"optimizer": "sam", "rho": 0.05, "m": None, "lr": 0.05})
    assert sam.settings == {"optimizer": "sam", "rho": 0.05, "m": None, "lr": 0.05, "weight_decay": 5e-4}


def test_a_declared_rho_and_baseline_params_reach_the_baseline_config():
    swept = sweep(
        baselines=({"optimizer": "sgd"}, {"optimizer": "sam", "rho": 0.1, "sam_variant": "looksam"}),
        baseline_params={"lr": 0.2},
    )
    sgd, sam = baseline_trials(swept, space, BOTH)
    assert sam.point == {"optimizer": "sam", "rho": 0.1, "m": None, "lr": 0.2}
    # A setting the space does not search is added to the baseline's config by the searcher.
    assert sam.extras == {"sam_variant": "looksam"}
    search = CellSearch(
        [_Fixed({"optimizer": "sam", "rho": 0.1})] * 1,
        trials=3,
        metric="val_error",
        mode="min",
        baselines=[sgd.extras, sam.extras],
    )
    first, second, third = (search.suggest(str(i)) for i in range(3))
    assert first["baseline"] and not first.get("sam_variant")
    assert second["baseline"] and second["sam_variant"] == "looksam" and second["rho"] == 0.1
    assert not third["baseline"] and "sam_variant" not in third


class _Fixed:
    def __init__(self, config):
        self.config = config

    def suggest(self, trial_id):
        return dict(self.config)


def test_a_baseline_value_the_space_does_not_offer_is_refused_before_any_trial():
    with pytest.raises(SpaceError, match=r"baselines\[1\]: rho=0.9 \(declared\) is not among what the space offers"):
        baseline_trials(sweep(baselines=({"optimizer": "sgd"}, {"optimizer": "sam", "rho": 0.9})), space, BOTH)
    with pytest.raises(SpaceError, match=r"lr=0.05 \(its default\) is not among .* declare a value"):
        baseline_trials(
            sweep(),
            lambda t: t.suggest_categorical("optimizer", ["sgd", "sam"]) and t.suggest_float("lr", 0.1, 0.5),
            BOTH,
        )
    # A space that offers only one optimizer has no SGD-vs-SAM baselines to declare.
    assert baseline_trials(sweep(), space, [{"optimizer": "sam"}]) == []


# ------------------------------------------------------------------------------ confirmation


def searched(cell, best_sgd=0.2, best_sam=0.1, sam_m=16):
    result = CellResult(cell)
    result.trials["a"] = TrialRow("a", {"optimizer": "sgd", "lr": 0.1}, "finished", metrics={"val_error": best_sgd})
    result.trials["b"] = TrialRow(
        "b", {"optimizer": "sam", "lr": 0.2, "rho": 0.2, "m": sam_m}, "finished", metrics={"val_error": best_sam}
    )
    result.trials["c"] = TrialRow(
        "c", {"optimizer": "sam", "lr": 0.3, "rho": 0.3}, "stopped", metrics={"val_error": 0.01}
    )  # ASHA stopped it: not a pick
    return result


def test_each_cell_confirms_its_picks_on_every_seed_exactly_once():
    swept = sweep(confirm_seeds=3, m_ablation=(None, 32, 16, 5), m_ablation_rates=(0.4,))
    results = [searched(cell) for cell in swept.cells()]
    runs = reruns(swept, results, baseline_trials(swept, space, BOTH))
    per_cell = {}
    for r in runs:
        per_cell.setdefault(r.cell.label, []).append((r.name, r.seed))
        assert r.config["seed"] == r.seed and r.config["data_seed"] == 0 and r.config["confirms"] == r.name
        assert r.config["label_noise_rate"] == r.cell.label_noise_rate and not r.config["baseline"]
    # m=16 is the best SAM configuration itself and m=5 does not divide 64: neither runs again.
    names = {
        "noise=0": ["best_sgd", "best_sam", "sam_baseline"],
        "noise=0.4": ["best_sgd", "best_sam", "sam_baseline", "m=None", "m=32"],
    }
    for label, expected in names.items():
        assert sorted(per_cell[label]) == sorted((n, s) for n in expected for s in (1, 2, 3))
    assert results[1].aliases == {"m=16": "best_sam"}
    assert all(r.config["lr"] == 0.2 and r.config["rho"] == 0.2 for r in runs if r.name.startswith("m="))
    # With vary_noise_draw each seed draws its own label noise too.
    varied = reruns(sweep(confirm_seeds=2, vary_noise_draw=True), [searched(sweep().cells()[0])], [])
    assert {(r.seed, r.config["data_seed"]) for r in varied} == {(1, 1), (2, 2)}


def confirmed(cell, errors: dict[str, list[float]], best_epoch_shift=0.0):
    result = CellResult(cell)
    for name, values in errors.items():
        for seed, value in enumerate(values, start=1):
            result.reruns[(name, seed)] = TrialRow(
                f"{name}{seed}",
                {"optimizer": name},
                "finished",
                metrics={"test_error": value},
                best_epoch={"test_error": value + best_epoch_shift, "val_error": 0.1},
            )
    return result


def test_the_verdict_table_names_a_winner_only_where_the_interval_excludes_zero():
    clear, unclear = sweep().cells()
    verdicts = [
        cell_verdict(
            clear.label,
            *seed_values(confirmed(clear, {"best_sgd": [0.30, 0.32, 0.31], "best_sam": [0.20, 0.21, 0.21]})),
        ),
        cell_verdict(
            unclear.label,
            *seed_values(
                confirmed(
                    unclear, {"best_sgd": [0.30, 0.35, 0.28], "best_sam": [0.31, 0.29, 0.30]}, best_epoch_shift=-0.05
                )
            ),
        ),
    ]
    rows = verdict_rows(verdicts)
    assert [(r["cell"], r["selection"]) for r in rows] == [
        ("noise=0", "final epoch"),
        ("noise=0", "best validation epoch"),
        ("noise=0.4", "final epoch"),
        ("noise=0.4", "best validation epoch"),
    ]
    assert rows[0]["verdict"].startswith("SAM better: lower by 0.103") and rows[0]["seeds"] == "3"
    assert rows[0]["decided"] == "look 1 of 1, 95.0% interval"
    assert rows[2]["verdict"].startswith("undecided at 3 seeds")
    assert rows[3]["SGD"].startswith("0.260")  # the best-validation-epoch values, labelled as such
    table = markdown(verdicts)
    assert "| noise=0 | final epoch |" in table and "mean [95% CI]" in table and "the interval that decided" in table


def test_a_baseline_that_is_also_the_best_configuration_runs_once():
    # A trial's settings include the sweep's fixed ones; the declared baseline's do not.
    swept = sweep(confirm_seeds=2, fixed={"sharpness_measures": ""})
    sgd, sam = baseline_trials(swept, space, BOTH)
    result = CellResult(swept.cells()[0])
    result.trials["a"] = TrialRow(
        "a", {**sgd.settings, "sharpness_measures": ""}, "finished", metrics={"val_error": 0.2}
    )
    result.trials["b"] = TrialRow(
        "b", {**sam.settings, "sharpness_measures": ""}, "finished", metrics={"val_error": 0.1}
    )
    runs = reruns(swept, [result], [sgd, sam])
    assert sorted({r.name for r in runs}) == ["best_sam", "best_sgd"] and len(runs) == 4
    assert result.aliases == {"sam_baseline": "best_sam"}


def test_a_cells_dataset_digest_is_the_labels_it_trains_on():
    from samtune.sweep.datasets import cell_dataset

    swept = sweep(label_noise_rates=(0.0, 0.4))
    clean, noisy = (cell_dataset(swept, cell) for cell in swept.cells())
    assert cell_dataset(swept, swept.cells()[1]) == noisy  # the same draw, the same digest
    assert clean["digest"] != noisy["digest"] and clean["profile"]["flipped_labels"] == 0
    assert noisy["profile"]["flipped_labels"] == pytest.approx(0.4 * noisy["profile"]["train_examples"], rel=0.1)
    # Another data seed draws other noisy labels: another digest.
    other = cell_dataset(sweep(label_noise_rates=(0.0, 0.4), seed=1), swept.cells()[1])
    assert other["digest"] != noisy["digest"]


def test_a_verdict_is_the_same_to_the_last_bit_whatever_order_its_runs_ended_in():
    """Runs end in an order timing decides; a mean summed in that order differed in its last
    bit between two reruns of the main job."""
    import json
    import random

    from samtune.verdicts import jsonable

    rng = random.Random(0)
    values = {name: {"final": {s: rng.random() / 7 for s in range(1, 11)}} for name in ("best_sgd", "best_sam")}
    reference = json.dumps(jsonable(cell_verdict("c", values)))
    for _ in range(20):
        shuffled = {name: {"final": dict(rng.sample(sorted(v["final"].items()), 10))} for name, v in values.items()}
        assert json.dumps(jsonable(cell_verdict("c", shuffled))) == reference


def test_a_cell_that_lost_its_sgd_baseline_answers_none_and_says_why():
    """The SGD baseline failed (its checkpoint unreadable on resume): the confirmation runs still
    compare two picks, but the cell's answer must not read as if the baseline had been in it."""
    from samtune.sequential import Design
    from samtune.sweep.confirm import judged

    cell = sweep().cells()[0]
    result = confirmed(cell, {"best_sgd": [0.30, 0.32, 0.31], "best_sam": [0.20, 0.21, 0.21]})
    result.trials["base"] = TrialRow(
        "base",
        {"optimizer": "sgd", "lr": 0.05},
        "failed",
        baseline=True,
        error="FileNotFoundError: checkpoint_000002/trial.pt",
    )
    result.trials["a"] = TrialRow("a", {"optimizer": "sgd", "lr": 0.2}, "finished", metrics={"val_error": 0.3})
    result.trials["b"] = TrialRow("b", {"optimizer": "sam", "lr": 0.2}, "finished", metrics={"val_error": 0.2})
    rows = verdict_rows([judged(result, Design(looks=(3,)))])
    assert rows and all(
        r["verdict"] == "none: its SGD baseline failed (FileNotFoundError: checkpoint_000002/trial.pt)" for r in rows
    )
    # The same cell with its baseline: a verdict.
    result.trials["base"].status = "finished"
    assert verdict_rows([judged(result, Design(looks=(3,)))])[0]["verdict"].startswith("SAM better")


def test_a_cell_with_no_sgd_trial_finished_still_has_a_row_saying_so():
    from samtune.sequential import Design
    from samtune.sweep.confirm import judged

    result = CellResult(sweep().cells()[1])
    result.trials["a"] = TrialRow("a", {"optimizer": "sgd"}, "failed", error="RuntimeError: boom")
    result.trials["b"] = TrialRow("b", {"optimizer": "sam"}, "finished", metrics={"val_error": 0.2})
    rows = verdict_rows([judged(result, Design(looks=(3,)))])
    assert [(r["cell"], r["verdict"]) for r in rows] == [("noise=0.4", "none: no SGD trial of the search finished")]

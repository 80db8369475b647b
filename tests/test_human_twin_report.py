"""The report's human-minus-twin comparison: SAM's gain over SGD under human label noise minus
its gain under the synthetic twin, paired by confirmation seed.

A synthetic sweep with known confirmed errors per cell, pick and seed; every expected mean and
interval is computed here from those numbers with scipy's Student-t (paired) and Welch
intervals, not with samtune's helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from samtune.report.answers import confirmation_frame, human_minus_twin, human_twin_table
from samtune.report.page import build_report
from samtune.report.runs import TrialRecord
from samtune.report.table import tabulate
from samtune.report.views import discover_views
from samtune.sweep.tracking import Tracker

WORST, WORST_TWIN = "CIFAR-10N worst, 40.2%", "CIFAR-10N worst, 40.2% (synthetic twin)"
AGGRE, AGGRE_TWIN = "CIFAR-10N aggre, 9.0%", "CIFAR-10N aggre, 9.0% (synthetic twin)"
R1, R1_TWIN = "CIFAR-10N random1, 17.2%", "CIFAR-10N random1, 17.2% (synthetic twin)"
R2 = "CIFAR-10N random2, 18.1%"  # no twin cell
KINDS = {
    "noise=0.2": "symmetric",
    WORST: "human:worst",
    WORST_TWIN: "twin:worst",
    AGGRE: "human:aggre",
    AGGRE_TWIN: "twin:aggre",
    R1: "human:random1",
    R1_TWIN: "twin:random1",
    R2: "human:random2",
}
SEEDS = (1, 2, 3, 4, 5)

# Final-epoch test error per (cell, pick), one per seed of SEEDS (or of the seeds given).
FINAL = {
    (WORST, "best_sgd"): (0.50, 0.52, 0.49, 0.55, 0.51),
    (WORST, "best_sam"): (0.45, 0.46, 0.45, 0.48, 0.47),
    (WORST_TWIN, "best_sgd"): (0.40, 0.43, 0.41, 0.42, 0.40),
    (WORST_TWIN, "best_sam"): (0.38, 0.42, 0.39, 0.40, 0.39),
    (AGGRE, "best_sgd"): (0.20, 0.21, 0.22),
    (AGGRE, "best_sam"): (0.18, 0.20, 0.20),
    (AGGRE_TWIN, "best_sgd"): (0.15, 0.17, 0.16),
    (AGGRE_TWIN, "best_sam"): (0.14, 0.15, 0.15),
    (R1, "best_sgd"): (0.30, 0.31, 0.33),
    (R1, "best_sam"): (0.29, 0.29, 0.30),
    (R2, "best_sgd"): (0.30, 0.31),
    (R2, "best_sam"): (0.29, 0.29),
    ("noise=0.2", "best_sgd"): (0.30, 0.31),
    ("noise=0.2", "best_sam"): (0.29, 0.29),
}
# The twin of random1 confirmed on other seeds: nothing to pair, Welch's interval instead.
R1_TWIN_SEEDS = (11, 12, 13)
FINAL[(R1_TWIN, "best_sgd")] = (0.28, 0.30, 0.29)
FINAL[(R1_TWIN, "best_sam")] = (0.27, 0.28, 0.29)
# How much lower each run's test error is at its best validation epoch (early stopping): under
# human noise early stopping helps SGD by 3 points and SAM by 1; under the twin neither.
EARLY = {(WORST, "best_sgd"): 0.03, (WORST, "best_sam"): 0.01}


def seeds_of(cell: str) -> tuple[int, ...]:
    return R1_TWIN_SEEDS if cell == R1_TWIN else SEEDS


def gains(cell: str, early: bool = False) -> dict[int, float]:
    """The expected gain per seed, from the table above."""
    out = {}
    for i, seed in enumerate(seeds_of(cell)):
        sgd, sam = FINAL[(cell, "best_sgd")], FINAL[(cell, "best_sam")]
        if i < len(sgd) and i < len(sam):
            shift = EARLY.get((cell, "best_sgd"), 0.0) - EARLY.get((cell, "best_sam"), 0.0) if early else 0.0
            out[seed] = sgd[i] - sam[i] - shift
    return out


def trial_records() -> list[TrialRecord]:
    """Two search trials per cell (SGD, SAM), each cell with its noise kind."""
    records = []
    for cell in KINDS:
        for optimizer in ("sgd", "sam"):
            records.append(
                TrialRecord(
                    run_id=f"{cell}-{optimizer}",
                    tags={"samtune.cell": cell, "samtune.status": "finished"},
                    params=params(cell, optimizer, 0),
                    history={"val_error": [(1, 0.5), (2, 0.4)], "test_error": [(1, 0.5), (2, 0.4)]},
                )
            )
    return records


def params(cell: str, optimizer: str, seed: int) -> dict[str, str]:
    kind = KINDS[cell]
    return {
        "optimizer": optimizer,
        "lr": "0.05",
        "rho": "0.05" if optimizer == "sam" else "None",
        "scenario": "label_noise",
        "label_noise_kind": kind,
        "label_noise_rate": "0.2" if kind == "symmetric" else "0.4",
        "seed": str(seed),
        "epochs": "3",
        "dataset": "cifar10",
    }


def confirmation_records(failed: frozenset[tuple[str, str, int]] = frozenset()) -> list[TrialRecord]:
    """Every confirmation run of FINAL; ``failed`` (cell, pick, seed) runs failed and logged nothing."""
    records = []
    for (cell, name), errors in FINAL.items():
        for seed, final in zip(seeds_of(cell), errors):
            early = final - EARLY.get((cell, name), 0.0)
            lost = (cell, name, seed) in failed
            records.append(
                TrialRecord(
                    run_id=f"{cell}-{name}-{seed}",
                    tags={
                        "samtune.cell": cell,
                        "samtune.confirms": name,
                        "samtune.seed": str(seed),
                        "samtune.status": "failed" if lost else "finished",
                    },
                    params=params(cell, name.removeprefix("best_"), seed),
                    # Lowest validation error at epoch 2: the early-stopping pick.
                    history={}
                    if lost
                    else {
                        "val_error": [(1, 0.6), (2, 0.3), (3, 0.4)],
                        "test_error": [(1, 0.6), (2, early), (3, final)],
                    },
                )
            )
    return records


def runs_with(confirmations: list[TrialRecord]):
    runs = tabulate("human", trial_records())
    runs.confirmations = confirmation_frame(confirmations)
    return runs


def row_of(rows, human: str, rule: str = "final"):
    return next(r for r in rows if r["human_cell"] == human and r["rule"] == rule)


def paired_t(diffs: list[float]) -> tuple[float, float, float]:
    n = len(diffs)
    mean = float(np.mean(diffs))
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=mean, scale=np.std(diffs, ddof=1) / math.sqrt(n))
    return mean, low, high


def test_the_difference_is_the_paired_t_interval_of_the_seeds_gains():
    rows = human_minus_twin(runs_with(confirmation_records()))
    # Every human cell gets its rows, each rule of its cells; the symmetric cell none.
    assert {r["human_cell"] for r in rows} == {WORST, AGGRE, R1, R2}
    for rule, early in (("final", False), ("best_epoch", True)):
        human, twin = gains(WORST, early), gains(WORST_TWIN, early)
        diffs = [human[s] - twin[s] for s in SEEDS]
        mean, low, high = paired_t(diffs)
        row = row_of(rows, WORST, rule)
        est = row["difference"]
        assert est.paired and est.n == 5 and row["seeds"] == list(SEEDS) and row["left_out"] == []
        assert (est.mean, est.low, est.high) == (pytest.approx(mean), pytest.approx(low), pytest.approx(high))
        # The same interval as scipy's paired t-test of the two cells' gains.
        check = scipy_stats.ttest_rel([human[s] for s in SEEDS], [twin[s] for s in SEEDS]).confidence_interval(0.95)
        assert (est.low, est.high) == (pytest.approx(check.low), pytest.approx(check.high))
        assert row["human"].mean == pytest.approx(np.mean(list(human.values())))
        assert row["twin"].mean == pytest.approx(np.mean(list(twin.values())))
    # Final epoch: gains 5.2 and 1.6 points, 3.6 larger under human noise, interval above 0.
    final = row_of(rows, WORST)
    assert final["difference"].mean == pytest.approx(0.036)
    # scipy.stats.t.interval(0.95, 4, loc=3.6, scale=sd([3, 5, 2, 5, 3]) / sqrt(5)) = (1.934, 5.266)
    assert final["reading"] == (
        "SAM's gain is 3.60 points larger under human noise than under its synthetic twin [1.93, 5.27], 5 seeds, paired"
    )
    mean, low, high = paired_t([0.01, 0.03, 0.0, 0.03, 0.01])  # early stopping takes 2 points off
    early = row_of(rows, WORST, "best_epoch")
    assert early["difference"].mean == pytest.approx(0.016)
    assert early["reading"] == (
        "no detectable difference: SAM's gain under human noise minus its gain under the synthetic twin is "
        f"+{100 * mean:.2f} points [{100 * low:+.2f}, {100 * high:+.2f}], 5 seeds, paired"
    )
    assert low < 0 < high


def test_a_seed_missing_in_one_cell_is_left_out_of_the_pairs_and_named():
    # The twin's best SAM failed on seed 5: seed 5 has no gain in the twin cell.
    rows = human_minus_twin(runs_with(confirmation_records(frozenset({(WORST_TWIN, "best_sam", 5)}))))
    row = row_of(rows, WORST)
    human, twin = gains(WORST), gains(WORST_TWIN)
    mean, low, high = paired_t([human[s] - twin[s] for s in (1, 2, 3, 4)])
    est = row["difference"]
    assert est.paired and est.n == 4 and row["seeds"] == [1, 2, 3, 4] and row["left_out"] == [5]
    assert (est.mean, est.low, est.high) == (pytest.approx(mean), pytest.approx(low), pytest.approx(high))
    # Both cells' gains are shown on the seeds the pairs used.
    assert row["human"].n == 4 and row["human"].mean == pytest.approx(np.mean([human[s] for s in (1, 2, 3, 4)]))
    assert "4 seeds, paired (seed 5 left out: not run with both SGD and SAM in both cells)" in row["reading"]


def test_cells_on_different_seeds_get_welchs_interval_and_say_it_is_unpaired():
    row = row_of(human_minus_twin(runs_with(confirmation_records())), R1)
    human, twin = list(gains(R1).values()), list(gains(R1_TWIN).values())
    welch = scipy_stats.ttest_ind(human, twin, equal_var=False).confidence_interval(0.95)
    est = row["difference"]
    assert not est.paired and row["seeds"] == [1, 2, 3, 11, 12, 13]
    assert est.mean == pytest.approx(np.mean(human) - np.mean(twin))
    assert (est.low, est.high) == (pytest.approx(welch.low), pytest.approx(welch.high))
    assert "unpaired (Welch): the cells share 0 seed(s) with both SGD and SAM runs" in row["reading"]


def test_a_cell_without_runs_to_pair_says_why_its_column_is_empty():
    lost = frozenset((AGGRE_TWIN, "best_sam", s) for s in SEEDS) | {(AGGRE_TWIN, "best_sgd", 1)}
    rows = human_minus_twin(runs_with([r for r in confirmation_records(lost)]))
    row = row_of(rows, AGGRE)
    assert row["difference"] is None and row["seeds"] == []
    assert row["reading"] == (
        f"no comparison: {AGGRE_TWIN}: none of its best SAM's 3 confirmation runs finished (failed 3)"
    )
    # A cell with no confirmation run recorded at all.
    rows = human_minus_twin(runs_with([r for r in confirmation_records() if r.tags["samtune.cell"] != AGGRE_TWIN]))
    assert row_of(rows, AGGRE)["reading"] == (
        f"no comparison: {AGGRE_TWIN}: no confirmation run of its best SGD was recorded; "
        "no confirmation run of its best SAM was recorded"
    )
    assert row_of(rows, R2)["reading"].startswith("no twin cell in this sweep (human_noise_twins=False)")
    # No confirmation stage at all.
    rows = human_minus_twin(runs_with([]))
    assert {r["reading"] for r in rows} == {
        "no comparison: this sweep ran no confirmation stage (confirm_seeds=0), so there are no seeds to pair",
        "no twin cell in this sweep (human_noise_twins=False): nothing to compare with",
    }
    table = human_twin_table(rows)
    assert table["human - twin mean (points)"].isna().all() and (table["seeds"] == 0).all()


def test_the_table_gives_points_and_a_sweep_without_human_cells_gets_none():
    table = human_twin_table(human_minus_twin(runs_with(confirmation_records()))).set_index(["human cell", "selection"])
    row = table.loc[(WORST, "final epoch")]
    assert row["twin cell"] == WORST_TWIN and row["seeds"] == 5 and row["paired"]
    assert row["SAM gain, human (points)"] == pytest.approx(5.2)
    assert row["SAM gain, twin (points)"] == pytest.approx(1.6)
    assert row["human - twin mean (points)"] == pytest.approx(3.6)
    symmetric = [r for r in trial_records() if KINDS[r.tags["samtune.cell"]] == "symmetric"]
    runs = tabulate("plain", symmetric)
    runs.confirmations = confirmation_frame(
        [r for r in confirmation_records() if r.tags["samtune.cell"] == "noise=0.2"]
    )
    assert human_minus_twin(runs) == []
    view = next(s for s in discover_views() if s.name == "answer").function(runs)
    assert "human_vs_twin" not in view.data and not any("twin" in n for n in view.notes)


def write_store(uri: str, folder, experiment: str) -> None:
    """The synthetic sweep written as the sweep driver writes it (search trials and confirmations)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).create_experiment(experiment, artifact_location=(folder / experiment).as_uri())
    tracker = Tracker(uri, experiment, folder / "unlogged.jsonl")
    tracker.declare(experiment, experiment, "sweep")
    tracker.log_params(experiment, {"name": experiment, "epochs": 3})
    for record in trial_records() + confirmation_records(frozenset({(WORST_TWIN, "best_sam", 5)})):
        cell = record.tags["samtune.cell"]
        cell_key = f"{experiment}/{cell}"
        tracker.declare(cell_key, cell, "cell", parent=experiment, **{"samtune.cell": cell})
        key = f"{cell_key}/{record.run_id}"
        role = "confirm" if "samtune.confirms" in record.tags else "trial"
        tracker.declare(key, record.run_id, role, parent=cell_key, **{**record.tags, "samtune.status": "running"})
        tracker.log_params(key, record.params)
        for epoch in range(1, 4):
            metrics = {name: dict(points)[epoch] for name, points in record.history.items() if epoch in dict(points)}
            if metrics:
                tracker.log_metrics(key, {"epoch": epoch, **metrics}, step=epoch)
        tracker.set_status(key, record.tags["samtune.status"])
    assert tracker.close() is None


@pytest.mark.slow
def test_the_report_reads_the_comparison_back_from_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    write_store(uri, tmp_path, "human")
    built = build_report("human", tracking_uri=uri, out=tmp_path / "report", strict=True)
    views = {r.spec.name: r.view for r in built.views}
    table = views["answer"].data["human_vs_twin"].set_index(["human cell", "selection"])
    human, twin = gains(WORST), gains(WORST_TWIN)
    mean, low, high = paired_t([human[s] - twin[s] for s in (1, 2, 3, 4)])
    row = table.loc[(WORST, "final epoch")]
    assert row["seeds"] == 4 and row["paired"]
    assert (row["human - twin mean (points)"], row["human - twin low (points)"], row["human - twin high (points)"]) == (
        pytest.approx(100 * mean),
        pytest.approx(100 * low),
        pytest.approx(100 * high),
    )
    sentence = f"SAM's gain is {100 * mean:.2f} points larger under human noise than under its synthetic twin"
    note = next(n for n in views["answer"].notes if n.startswith(f"Human minus twin, {WORST} (") and "final epoch" in n)
    assert sentence in note and "best SAM against its best SGD, test error at the final epoch" in note
    assert any(sentence in n for n in views["robustness"].notes)
    assert any(
        n.startswith(f"Human minus twin, {WORST} (") and "at the best validation epoch (early stopping)" in n
        for n in views["answer"].notes
    )
    page = (tmp_path / "report" / "index.html").read_text()
    assert sentence.replace("'", "&#x27;") in page and "human_vs_twin" in page

"""Ablations: which runs a cell's ablation asks for (names, aliases, order), and the curves and
robust ranges the verdicts make of them, checked against the t interval computed here."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

from samtune.sweep.ablations import rho_grid
from samtune.sweep.confirm import reruns, role_of
from samtune.sweep.results import CellResult, TrialRow
from samtune.sweep.study import Sweep
from samtune.verdicts import cell_verdict

SEEDS = (1, 2, 3, 4)
# Seed effects shared by every configuration (what pairing by seed cancels) and a small
# per-run wobble, so each interval has a width.
SHARED = {1: 0.00, 2: 0.03, 3: -0.02, 4: 0.01}
WOBBLE = {1: 0.001, 2: -0.002, 3: 0.0015, 4: -0.0005}


def t_interval(xs):
    xs = np.asarray(xs, dtype=float)
    half = stats.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
    return xs.mean() - half, xs.mean() + half


def runs(base, shift=0.0, wobble=1.0):
    return {"final": {s: base + shift + SHARED[s] + wobble * WOBBLE[s] for s in SEEDS}}


def synthetic():
    """rho flat (every value within 0.002 of the optimum's error), lr sharp (every move 0.1
    worse), SGD's lr curve with one value just worse by less than the margin."""
    values = {
        "best_sam": runs(0.20),
        "best_sgd": runs(0.30),
        "rho=0.01": runs(0.20, 0.001, -1.0),
        "rho=0.2": runs(0.20, -0.001, 0.5),
        "rho=0.5": runs(0.20, 0.002, 2.0),
        "lr=x0.5": runs(0.20, 0.10),
        "lr=x2": runs(0.20, 0.12, -1.0),
        "sgd lr=x0.5": runs(0.30, 0.004, 0.5),
        "sgd lr=x4": runs(0.30, 0.05),
    }
    params = {"best_sam": {"rho": 0.05, "m": None}}
    return values, params


def test_a_flat_setting_is_robust_everywhere_and_a_sharp_one_only_at_the_optimum():
    values, params = synthetic()
    curves = cell_verdict("noise=0.4", values, params)["curves"]
    assert list(curves) == ["rho", "lr", "sgd lr"]
    rho = curves["rho"]
    # The pick's own rho (0.05) is a point of its curve, in order of the value.
    assert [p["label"] for p in rho["points"]] == ["0.01", "0.05", "0.2", "0.5"]
    assert [p["optimum"] for p in rho["points"]] == [False, True, False, False]
    assert rho["robust"]["final"] == ["0.01", "0.05", "0.2", "0.5"]
    assert rho["robust_range"]["final"] == ["0.01", "0.5"]
    lr = curves["lr"]
    assert [p["label"] for p in lr["points"]] == ["x0.5", "x1", "x2"]
    assert lr["robust"]["final"] == ["x1"] and lr["robust_range"]["final"] == ["x1", "x1"]
    sgd = curves["sgd lr"]
    assert sgd["of"] == "best_sgd" and sgd["robust"]["final"] == ["x0.5", "x1"]
    assert sgd["robust_range"]["final"] == ["x0.5", "x1"]


def test_curve_points_and_differences_are_the_t_intervals():
    values, params = synthetic()
    curves = cell_verdict("noise=0.4", values, params)["curves"]
    for key, of in (("rho", "best_sam"), ("lr", "best_sam"), ("sgd lr", "best_sgd")):
        for point in curves[key]["points"]:
            name = of if point["optimum"] else point["name"]
            xs = [values[name]["final"][s] for s in SEEDS]
            est = point["final"]
            assert (est.mean, est.low, est.high, est.n) == pytest.approx((np.mean(xs), *t_interval(xs), 4))
            diffs = [values[name]["final"][s] - values[of]["final"][s] for s in SEEDS]
            diff = point["final difference"]
            if point["optimum"]:
                assert diff.mean == 0 and diff.high == 0
                continue
            assert diff.paired and (diff.mean, diff.low, diff.high) == pytest.approx(
                (np.mean(diffs), *t_interval(diffs))
            )
            # Robust exactly when the upper bound of that interval is within the margin (0.01).
            assert (point["label"] in curves[key]["robust"]["final"]) == (t_interval(diffs)[1] <= 0.01)


def test_the_m_curve_keeps_its_shape_beside_the_new_curves():
    values = {"best_sam": runs(0.20), "m=None": runs(0.20), "m=8": runs(0.22)}
    verdict = cell_verdict("noise=0.4", values, {"best_sam": {"m": None}})
    assert list(verdict["m_curve"]) == ["None", "8"]
    assert [p["label"] for p in verdict["curves"]["m"]["points"]] == ["None", "8"]
    assert verdict["curves"]["m"]["robust"]["final"] == ["None"]


def sweep(**changes):
    base = dict(
        name="demo",
        dataset="digits",
        model="cnn",
        epochs=2,
        batch_size=32,
        trials=2,
        confirm_seeds=2,
        label_noise_rates=(0.0, 0.4),
        ablation_rates=(0.4,),
    )
    return Sweep(**{**base, **changes})


def searched(cell):
    result = CellResult(cell)
    result.trials["a"] = TrialRow(
        "a", {"optimizer": "sam", "lr": 0.1, "rho": 0.05, "m": 8}, "finished", metrics={"val_error": 0.2}
    )
    result.trials["b"] = TrialRow("b", {"optimizer": "sgd", "lr": 0.2}, "finished", metrics={"val_error": 0.3})
    return result


def test_the_plan_moves_one_setting_at_a_time_in_the_named_cells_only():
    swept = sweep(ablations={"rho": (0.02, 0.05), "lr": (0.5, 2), "m": (None, 8)})
    results = [searched(c) for c in swept.cells()]
    planned = reruns(swept, results, [])
    names = [(r.cell.label, r.name) for r in planned if r.seed == 1]
    assert names == [
        ("noise=0", "best_sgd"),
        ("noise=0", "best_sam"),
        ("noise=0.4", "best_sgd"),
        ("noise=0.4", "best_sam"),
        ("noise=0.4", "m=None"),
        ("noise=0.4", "rho=0.02"),
        ("noise=0.4", "lr=x0.5"),
        ("noise=0.4", "lr=x2"),
        ("noise=0.4", "sgd lr=x0.5"),
        ("noise=0.4", "sgd lr=x2"),
    ]
    # The pick's own rho and m are the pick: its runs serve both names.
    assert results[1].aliases == {"m=8": "best_sam", "rho=0.05": "best_sam"} and not results[0].aliases
    by_name = {r.name: r.config for r in planned if r.seed == 1 and r.cell.label == "noise=0.4"}
    # Only rho moved; the ablation measures no sharpness, the best SAM the Hessian's top eigenvalues
    # (`samtune.sweep.flatness`).
    flatness = {"sharpness_measures": "hessian_top_eig", "sharpness_settings": {"hessian_top_eig": {"k": 5}}}
    assert by_name["rho=0.02"] | {"rho": 0.05} | flatness == by_name["best_sam"] | {"confirms": "rho=0.02"}
    assert by_name["rho=0.02"]["sharpness_measures"] == ""
    assert by_name["lr=x0.5"]["lr"] == pytest.approx(0.05) and by_name["lr=x0.5"]["rho"] == 0.05
    assert by_name["sgd lr=x2"]["lr"] == pytest.approx(0.4) and by_name["sgd lr=x2"]["optimizer"] == "sgd"
    assert by_name["m=None"]["m"] is None
    # Every one on the first round's seeds, as ablation runs; the picks stay confirmation runs.
    assert {r.seed for r in planned} == {1, 2}
    assert {role_of(n) for _, n in names[4:]} == {"ablation"} and role_of("best_sam") == "confirm"
    # The same plan every time: nothing in it depends on timing.
    again = reruns(swept, [searched(c) for c in swept.cells()], [])
    assert [(r.name, r.seed, r.config) for r in again] == [(r.name, r.seed, r.config) for r in planned]
    # Later rounds never rerun an ablation.
    assert all(r.name in ("best_sgd", "best_sam") for r in reruns(swept, results, [], look=1))


def test_rho_default_grid_spans_the_space_range():
    def space(trial):
        if trial.suggest_categorical("optimizer", ["sgd", "sam"]) == "sam":
            trial.suggest_float("rho", 0.01, 0.5, log=True)

    swept = sweep(ablations={"rho": None})
    result = searched(swept.cells()[1])
    planned = [r.name for r in reruns(swept, [result], [], space=space) if r.seed == 1]
    assert planned[2:] == [f"rho={v:g}" for v in rho_grid(0.01, 0.5)]
    grid = rho_grid(0.01, 0.5)
    assert grid[0] == 0.01 and grid[-1] == 0.5 and np.allclose(np.diff(np.log(grid)), np.log(50) / 4, rtol=0.01)
    # Without the space: x0.25 to x4 of the pick's rho.
    assert [r.name for r in reruns(swept, [searched(swept.cells()[1])], []) if r.seed == 1][2] == "rho=0.0125"


def test_the_older_m_ablation_is_the_m_entry():
    old = sweep(m_ablation=(None, 8), m_ablation_rates=(0.4,), ablation_rates=None)
    assert old.ablated(old.cells()[0]) == {} and old.ablated(old.cells()[1]) == {"m": (None, 8)}
    assert "ablations" not in old.to_dict() and Sweep.from_dict(old.to_dict()) == old


# A Hessian measure among the trials' sharpness measures: the driver then measures the picks'
# spectral density (a sweep that asks for none gets none).
SPACE = """\
from samtune.sweep import Sweep

def space(trial):
    optimizer = trial.suggest_categorical('optimizer', ['sgd', 'sam'])
    trial.suggest_float('lr', 0.01, 0.5, log=True)
    if optimizer == 'sam':
        trial.suggest_float('rho', 0.01, 0.5, log=True)

SWEEP = Sweep(name='t', dataset='digits', model='mlp', epochs=2, batch_size=64, trials=2,
              label_noise_rates=(0.0, 0.4), confirm_seeds=2, ablation_rates=(0.4,),
              ablations={'rho': (0.02, 0.2), 'lr': (0.5,)},
              fixed={'sharpness_measures': 'hessian_top_eig'})
"""


@pytest.mark.slow
def test_a_real_sweep_records_its_ablations_and_the_sensitivity_view_draws_them(tmp_path):
    import subprocess

    from test_confirm import sweep_cmd
    from test_sweep import env, runs_of

    from samtune.report.load import load_runs
    from samtune.report.views import discover_views

    (tmp_path / "space.py").write_text(SPACE)
    done = subprocess.run(sweep_cmd(tmp_path), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^rho curve, noise=0.4 \(final epoch, 2 seeds\): .*robust range", done.stdout, flags=re.M)
    _, by_role = runs_of(tmp_path)
    ablation = by_role["ablation"]
    seen = {
        (r.data.tags["samtune.cell"], r.data.tags["samtune.confirms"], r.data.tags["samtune.ablates"]) for r in ablation
    }
    assert seen == {
        ("noise=0.4", "rho=0.02", "rho"),
        ("noise=0.4", "rho=0.2", "rho"),
        ("noise=0.4", "lr=x0.5", "lr"),
        ("noise=0.4", "sgd lr=x0.5", "lr"),
    }
    assert sorted(r.data.tags["samtune.seed"] for r in ablation) == ["1", "1", "1", "1", "2", "2", "2", "2"]
    runs = load_runs("t", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    spec = next(s for s in discover_views() if s.name == "sensitivity")
    shown = spec.function(runs)
    curves = shown.data["curves"]
    assert set(curves["curve"]) == {"rho", "lr", "sgd lr"} and set(curves["cell"]) == {"noise=0.4"}
    assert curves.groupby(["curve", "selection"])["optimum"].sum().eq(1).all()
    assert shown.figure is not None and any("no importance panels" in n for n in shown.notes)
    # The picks' spectral density: measured once, in the ablations' cell, on its run; drawn by the
    # claims view from that file alone.
    (cell_run,) = [r for r in by_role["cell"] if r.data.tags["samtune.cell"] == "noise=0.4"]
    assert cell_run.data.tags["samtune.spectral_density"] == "spectral_density.json"
    assert all("samtune.spectral_density" not in r.data.tags for r in by_role["cell"] if r is not cell_run)
    spectrum = runs.spectra["noise=0.4"]
    picks = dict(part.split(":", 1) for part in cell_run.data.tags["samtune.picks"].split(","))
    assert {name: f"{picks[name].rsplit('/', 1)[0]}/{p['trial_id']}" for name, p in spectrum["picks"].items()} == picks
    grid = np.asarray(spectrum["grid"])
    for name in ("best_sgd", "best_sam"):
        density = np.asarray(spectrum["density"][name])
        assert len(density) == len(grid) == spectrum["settings"]["bins"]
        # Each pick's density is a probability density over the grid: it integrates to 1.
        assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=0.02)
    claims = next(s for s in discover_views() if s.name == "claims").function(runs)
    assert set(claims.data["spectral_density"]["pick"]) == {"best_sgd", "best_sam"}
    # The compared picks' confirmation runs in the ablations' cell measured the top 5 eigenvalues;
    # no other confirmation run measured anything; the flatness rows pair them by seed.
    measured = {
        (r.data.tags["samtune.cell"], r.data.tags["samtune.confirms"])
        for r in by_role["confirm"]
        if "sharpness/hessian_top_eig_5" in r.data.metrics
    }
    assert measured == {("noise=0.4", "best_sgd"), ("noise=0.4", "best_sam")}
    assert all(not any(k.startswith("sharpness/") for k in r.data.metrics) for r in ablation)
    table = claims.data["claims"].set_index("claim")
    flat = table.loc["SAM finds flatter minima (lambda_max, noise=0.4)"]
    assert "confirmation runs, 2 fresh seeds" in flat["basis"] and flat["verdict"] == "undecided at 2 seeds"
    assert any(ax.get_yscale() == "log" for ax in claims.figure.axes)


# -- one rule for the robust range and the rho = 0.05 claim ----------------------------------------


def rho_cell(rho_005, rho_002=(0.0001, -0.0001, 0.0), rho_02=(0.05, 0.052, 0.048)):
    """One cell on the first round's 3 seeds: best SAM at rho 0.1, its rho curve at 0.02, 0.05 and
    0.2 as offsets from it per seed, best SGD well above."""
    sam = {1: 0.20, 2: 0.21, 3: 0.22}

    def moved(offsets):
        return {"final": {s: sam[s] + d for s, d in zip(sorted(sam), offsets)}}

    values = {
        "best_sam": {"final": sam},
        "best_sgd": {"final": {s: v + 0.1 for s, v in sam.items()}},
        "rho=0.02": moved(rho_002),
        "rho=0.05": moved(rho_005),
        "rho=0.2": moved(rho_02),
    }
    return values, {"best_sam": {"rho": 0.1, "m": None}}


def test_the_rho_claim_and_the_rho_curve_give_one_answer_where_the_95_percent_range_disagreed():
    """rho = 0.05 worse than the pick by 0.002 +- 0.002 on 3 seeds: the plain 95% interval's upper
    end (0.007) is inside the margin, so the old robust range held 0.05, while the verdicts' first
    look (a 99.2% interval) left the claim undecided. Now both use the verdicts' interval."""
    from samtune.report.claims import robust_default
    from samtune.sequential import Design

    values, params = rho_cell((0.002, 0.004, 0.0))
    design = Design(looks=(3, 6, 10), margin=0.01)
    verdict = cell_verdict("noise=0.4", values, params, design=design)
    diffs = [0.002, 0.004, 0.0]
    assert t_interval(diffs)[1] <= 0.01  # what the old robust range went by: 0.05 robust
    rho = verdict["curves"]["rho"]
    point = next(p for p in rho["points"] if p["label"] == "0.05")
    decision = point["final decision"]
    # The verdicts' interval: the first look's level, 1 - 0.05 * 3 / 19.
    half = stats.t.ppf(1 - 0.05 * 3 / 19 / 2, 2) * np.std(diffs, ddof=1) / math.sqrt(3)
    assert decision.interval.level == pytest.approx(1 - 0.05 * 3 / 19)
    assert (decision.interval.low, decision.interval.high) == pytest.approx((0.002 - half, 0.002 + half))
    assert decision.outcome == "undecided" and decision.interval.high > 0.01
    assert rho["robust"]["final"] == ["0.02", "0.1"] and rho["robust_range"]["final"] == ["0.1", "0.1"]
    assert [p["final decision"].outcome for p in rho["points"] if not p["optimum"]] == [
        "no worse",
        "undecided",
        "worse",
    ]
    row = robust_default([verdict], {})[0]
    assert row["claim"] == "rho = 0.05 is as good as the searched rho (noise=0.4)"
    assert row["verdict"] == "undecided at 3 seeds"
    assert "robust range uses this decision" in row["basis"]
    assert f"{decision.interval.high:+.3f}" in row["measured"]


@pytest.mark.parametrize("case", range(40))
def test_the_rho_claim_holds_exactly_where_its_curve_calls_rho_005_robust(case):
    """Random offsets of rho = 0.05 from the pick, from far worse to slightly better, under the
    sequential design and under one look: "holds" exactly where 0.05 is in the robust set, "does
    not hold" only where its decision says worse by more than the margin."""
    from samtune.report.claims import robust_default
    from samtune.sequential import Design

    rng = np.random.default_rng(case)
    offsets = tuple(rng.normal(rng.choice([-0.005, 0.0, 0.005, 0.012, 0.05]), rng.choice([0.0005, 0.003, 0.01]), 3))
    values, params = rho_cell(offsets)
    for design in (Design(looks=(3, 6, 10), margin=0.01), Design(looks=(3,), margin=0.01), None):
        verdict = cell_verdict("noise=0.4", values, params, design=design)
        point = next(p for p in verdict["curves"]["rho"]["points"] if p["label"] == "0.05")
        row = robust_default([verdict], {})[0]
        robust = "0.05" in verdict["curves"]["rho"]["robust"]["final"]
        assert (row["verdict"] == "holds") == robust, (offsets, design, row)
        assert (row["verdict"] == "does not hold") == (point["final decision"].outcome == "worse")
        assert robust == (point["final decision"].interval.high <= 0.01)


def test_a_value_worse_by_less_than_the_margin_is_robust_and_so_is_the_claim():
    """0.004 +- 0.0005 worse than the pick: detectably worse, but by less than the margin of 0.01.
    No worse by more than the margin: in the robust range, and the claim holds (the four-way
    verdict rule would have called it worse)."""
    from samtune.report.claims import robust_default
    from samtune.sequential import Design, outcome_of

    values, params = rho_cell((0.004, 0.0045, 0.0035))
    verdict = cell_verdict("noise=0.4", values, params, design=Design(looks=(3,), margin=0.01))
    point = next(p for p in verdict["curves"]["rho"]["points"] if p["label"] == "0.05")
    assert outcome_of(point["final difference"], 0.01) == "SGD better"  # detectably above 0
    assert point["final decision"].outcome == "no worse"
    assert "0.05" in verdict["curves"]["rho"]["robust"]["final"]
    assert robust_default([verdict], {})[0]["verdict"] == "holds"

"""`samtune sweep`: what the driver tells Optuna and MLflow (fast, no Ray), then end to end on the
embedded data (slow): the MLflow layout, ASHA stopping trials, resume after the driver is
interrupted or killed, a worker killed mid-trial, a diverging trial. The end-to-end tests run the
real command in a subprocess on a real local Ray instance."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import samtune.sweep.driver
from samtune.sweep.driver import prepare, run_sweep, trial_resources
from samtune.sweep.errors import SweepError
from samtune.sweep.pick_models import log_pick_models
from samtune.sweep.recording import Recorder, declare_sweep, write_state
from samtune.sweep.results import CellResult, TrialRow, load_study, summarize
from samtune.sweep.search import AshaAwareOptunaSearch
from samtune.sweep.study import Sweep
from samtune.sweep.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "noisy_digits.py"


# ------------------------------------------------------------------------------ fast


def lr_space(trial):  # at module level: a saved searcher pickles its space
    trial.suggest_float("lr", 0.01, 0.5, log=True)


def searcher(epochs=4):
    return AshaAwareOptunaSearch(
        space=lr_space, metric="val_error", mode="min", epochs=epochs, sampler=optuna.samplers.TPESampler(seed=0)
    )


def run_trial(search, trial_id, errors, last_epoch=None, diverged=False, error=False, asha_stops=False):
    """Feed `search` one trial as Tune does. `asha_stops`: ASHA ends the trial on its last result
    (at a rung, or at max_t), and Tune then hands that result to on_trial_complete only."""
    search.suggest(trial_id)
    result = {}
    for epoch, value in enumerate(errors, start=1):
        result = {"val_error": value, "epoch": epoch, "training_iteration": epoch, "diverged": 0}
        if not (asha_stops and epoch == len(errors)):
            search.on_trial_result(trial_id, result)
    if diverged:  # the trainer's last report: the epoch that went non-finite, as a bad result
        epoch = len(errors) + 1
        result = {"val_error": 1.0, "epoch": epoch, "training_iteration": epoch, "diverged": 1}
        search.on_trial_result(trial_id, result)
    search.on_trial_complete(trial_id, result=None if error else result, error=error)


def test_optuna_sees_an_asha_stop_as_pruned_a_divergence_as_a_bad_result_and_a_crash_as_a_failure():
    search = searcher(epochs=4)
    run_trial(search, "full", [0.6, 0.5, 0.4, 0.3], asha_stops=True)  # max_t reached
    run_trial(search, "stopped", [0.5, 0.2], asha_stops=True)  # better so far, but ASHA ended it at epoch 2
    run_trial(search, "diverged", [0.9], diverged=True)
    run_trial(search, "crashed", [0.7], error=True)
    run_trial(search, "first-rung", [0.8], asha_stops=True)  # stopped on its only result
    study = search._ot_study
    by_number = {t.number: t for t in study.trials}
    full, stopped, diverged, crashed, first_rung = (by_number[i] for i in range(5))
    assert (full.state, full.value) == (TrialState.COMPLETE, 0.3)
    # A pruned trial's value is the epoch ASHA stopped it on, though Tune passed that result to
    # on_trial_complete alone.
    assert (stopped.state, stopped.value) == (TrialState.PRUNED, 0.2)
    assert stopped.intermediate_values == {1: 0.5, 2: 0.2}
    assert (first_rung.state, first_rung.value) == (TrialState.PRUNED, 0.8)
    assert (diverged.state, diverged.value) == (TrialState.COMPLETE, 1.0)
    assert crashed.state == TrialState.FAIL
    # The best trial is the one that ran its budget, not the one stopped early on a lower value.
    assert study.best_trial.number == full.number


def test_cells_get_their_budgets_in_order_each_study_only_its_own_trials_and_survive_a_restore(tmp_path):
    from ray.tune.search import Searcher

    from samtune.sweep.search import CellSearch

    def cells_search():
        return CellSearch([searcher(), searcher()], trials=3, metric="val_error", mode="min", baselines=2)

    search = cells_search()
    dealt, marked = [], []
    for n in range(4):  # the 4th trial is cell 1's first, dealt while cell 0's trials still run
        config = search.suggest(f"t{n}")
        dealt.append(search.cell_of[f"t{n}"])
        marked.append(config["baseline"])
    assert dealt == [0, 0, 0, 1]
    assert marked == [True, True, False, True]  # each cell's first two trials are its baselines
    search.on_trial_result("t3", {"val_error": 0.9, "epoch": 1, "training_iteration": 1, "diverged": 0})
    search.on_trial_complete("t0", {"val_error": 0.2, "epoch": 4, "training_iteration": 4, "diverged": 0})
    search.on_trial_complete("ghost", {"val_error": 0.1})  # a trial no cell dealt: ignored
    search.save(str(tmp_path / "state.pkl"))
    restored = cells_search()
    restored.restore(str(tmp_path / "state.pkl"))
    for s in (search, restored):
        assert [s.suggest(f"t{n}") is not None for n in (4, 5)] == [True, True]
        assert s.suggest("t6") == Searcher.FINISHED
        assert Counter(s.cell_of.values()) == {0: 3, 1: 3}
        first, second = (sub._ot_study for sub in s.searchers)
        assert len(first.trials) == 3 and len(second.trials) == 3
        # Results reached only the study of the trial's own cell.
        assert [t.state for t in first.trials][0] == TrialState.COMPLETE and first.trials[0].value == 0.2
        assert second.trials[0].intermediate_values == {1: 0.9}
        assert all(not t.intermediate_values for t in first.trials)
    # The same seed, the same suggestions, restored or not.
    assert [t.params for t in restored.searchers[1]._ot_study.trials] == [
        t.params for t in search.searchers[1]._ot_study.trials
    ]


def test_asha_judges_a_trial_only_against_its_own_cell():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from samtune.sweep.search import CellScheduler

    def asha():
        s = ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2)
        s.set_search_properties("val_error", "min")
        return s

    # Cell 0.0 (clean labels) reaches low errors, cell 0.6 high ones. Results in the order a sweep
    # running both cells would give them.
    events = [
        ("a", 0.0, 0.10),
        ("b", 0.0, 0.05),
        ("x", 0.6, 0.50),
        ("y", 0.6, 0.45),
        ("z", 0.6, 0.40),
        ("c", 0.0, 0.30),
    ]
    trials = {tid: SimpleNamespace(trial_id=tid, config={"label_noise_rate": rate}) for tid, rate, _ in events}
    cells = CellScheduler([0.0, 0.6], [asha(), asha()], max_t=4)
    cells.set_search_properties("val_error", "min")
    alone = {0.0: asha(), 0.6: asha()}  # the reference: one ASHA fed only its cell's trials
    shared = asha()  # and what one ASHA for every cell would decide
    for t in trials.values():
        cells.on_trial_add(None, t)
        alone[t.config["label_noise_rate"]].on_trial_add(None, t)
        shared.on_trial_add(None, t)
    decided, reference, mixed = [], [], []
    for tid, rate, error in events:
        result = {"epoch": 1, "val_error": error}
        decided.append(cells.on_trial_result(None, trials[tid], result))
        reference.append(alone[rate].on_trial_result(None, trials[tid], result))
        mixed.append(shared.on_trial_result(None, trials[tid], result))
    assert decided == reference
    # Against the clean cell's errors every noisy trial would look hopeless.
    assert decided[2:5] != mixed[2:5] and TrialScheduler.STOP in mixed[2:5]
    with pytest.raises(ValueError, match="belongs to no cell"):
        cells.on_trial_add(None, SimpleNamespace(trial_id="q", config={"label_noise_rate": 0.3}))
    # A cell's baseline is never stopped before its budget's end, yet its result counts at its
    # rung as it would in plain ASHA: the next trial there is judged against it.
    first, base, third = (
        SimpleNamespace(trial_id=tid, config={"label_noise_rate": 0.0, "baseline": tid == "base"})
        for tid in ("first", "base", "third")
    )
    cells, plain = CellScheduler([0.0], [asha()], max_t=4), asha()
    for t in (first, base, third):
        cells.on_trial_add(None, t)
        plain.on_trial_add(None, t)
    for t, error in ((first, 0.1), (base, 0.9), (third, 0.45)):
        got = cells.on_trial_result(None, t, {"epoch": 1, "val_error": error})
        expected = plain.on_trial_result(None, t, {"epoch": 1, "val_error": error})
        if t is base:
            assert (got, expected) == (TrialScheduler.CONTINUE, TrialScheduler.STOP)
        else:
            assert got == expected == TrialScheduler.CONTINUE  # 0.45 passes only beside base's 0.9
    without = asha()
    for t, error in ((first, 0.1), (third, 0.45)):
        without.on_trial_add(None, t)
        decision = without.on_trial_result(None, t, {"epoch": 1, "val_error": error})
    assert decision == TrialScheduler.STOP
    assert cells.on_trial_result(None, base, {"epoch": 4, "val_error": 0.9}) == TrialScheduler.STOP  # its end


def test_trials_at_once_follow_the_cpus_and_never_exceed_the_budget():
    sweep = Sweep(name="s", dataset="digits", model="mlp", epochs=2, batch_size=32, trials=6)
    assert trial_resources(sweep, {"CPU": 2.0}) == ({"cpu": 1.0, "gpu": 0.0}, 1.0, 2)
    assert trial_resources(sweep.replace(trials=1), {"CPU": 8.0})[2] == 1
    # Cells share one Tuner: two cells of one trial each run side by side.
    assert trial_resources(sweep.replace(trials=1, label_noise_rates=(0.0, 0.4)), {"CPU": 8.0})[2] == 2
    assert trial_resources(sweep.replace(max_concurrent=3), {"CPU": 16.0})[2] == 3
    assert trial_resources(sweep.replace(cpus_per_trial=0.5), {"CPU": 2.0})[2] == 4
    # Several workers: the trial's own process holds no CPU, pinned to the head node, and its
    # workers a CPU each: one trial at a time on 2 cores, eight on 16 CPUs.
    two = sweep.replace(workers=2)
    head = {"node:__internal_head__": 1.0}
    tune_res, need, at_once = trial_resources(two, {"CPU": 2.0, **head})
    assert tune_res == {"cpu": 0.0, "gpu": 0.0, "node:__internal_head__": 0.001}
    assert need == 2.0 and at_once == 1
    assert trial_resources(two.replace(trials=20), {"CPU": 16.0, **head})[2] == 8
    # A cluster without Ray's head marker: a token CPU share, the workers 0.9 each.
    tune_res, need, at_once = trial_resources(two, {"CPU": 2.0})
    assert tune_res == {"cpu": 0.01, "gpu": 0.0} and need == pytest.approx(1.81) and at_once == 1


#: The settings a sharpness measurement reports beside its values (`measure_sharpness`'s shape).
SHARPNESS_SETTINGS = {
    "sharpness/m_sharpness/rho": 0.05,
    "sharpness/m_sharpness/m": 128.0,
    "sharpness/adaptive_sharpness/norm/l2": 1.0,
    "sharpness/seed": 0.0,
    "sharpness/subset": 256.0,
    "sharpness/params/head": 1.0,
}


def fake_trial(trial_id, **params):
    return SimpleNamespace(trial_id=trial_id, config=params)


def test_a_failed_baseline_trial_is_what_its_cell_is_missing(tmp_path):
    sweep = Sweep(
        name="lost", dataset="digits", model="mlp", epochs=3, batch_size=32, trials=4, label_noise_rates=(0.0,)
    )
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", sweep.name, tmp_path / "spool.jsonl")
    tracker.declare("lost", "lost", "sweep")
    cell = sweep.cells()[0]
    recorder = Recorder(sweep, cell, tracker, "lost")
    for name, optimizer, baseline in (("base", "sgd", True), ("sgd", "sgd", False), ("sam", "sam", False)):
        trial = fake_trial(name, **sweep.trial_config(cell, {"optimizer": optimizer, "lr": 0.1}), baseline=baseline)
        recorder.trial_start(trial)
        if name != "base":
            recorder.trial_result(trial, {"epoch": 3, "val_error": 0.3, "train_loss": 0.3, "diverged": 0, "done": True})
        recorder.trial_end(trial, failed=name == "base")
    assert tracker.close() is None
    assert recorder.result.missing().startswith("its SGD baseline failed (")


def test_the_driver_records_the_documented_mlflow_layout(tmp_path):
    sweep = Sweep(
        name="layout", dataset="digits", model="mlp", epochs=3, batch_size=32, trials=4, label_noise_rates=(0.0, 0.4)
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, sweep.name, tmp_path / "spool.jsonl")
    tracker.declare("layout", "layout", "sweep")
    cell = sweep.cells()[1]
    recorder = Recorder(sweep, cell, tracker, "layout")
    outcomes = {"finished": [0.5, 0.4, 0.3], "stopped": [0.6], "diverged": [0.7, float("nan")]}
    for number, (name, errors) in enumerate(outcomes.items()):
        trial = fake_trial(name, **sweep.trial_config(cell, {"optimizer": "sgd", "lr": 0.1, "trial_number": number}))
        recorder.trial_start(trial)
        for epoch, value in enumerate(errors, start=1):
            diverged = value != value
            # Sharpness measured every epoch: its settings each time, its value and cost changing.
            measured = {**SHARPNESS_SETTINGS, "sharpness/m_sharpness": value, "sharpness/m_sharpness/seconds": 0.1}
            recorder.trial_result(
                trial,
                {
                    "epoch": epoch,
                    "val_error": 1.0 if diverged else value,
                    "train_loss": value,
                    "diverged": int(diverged),
                    "done": False,
                    **({} if diverged else measured),
                },
            )
        recorder.trial_end(trial, failed=False)
    crashed = fake_trial(
        "failed", **sweep.trial_config(cell, {"optimizer": "sam", "lr": 0.1, "rho": 0.1, "baseline": True})
    )
    recorder.trial_start(crashed)
    recorder.trial_end(crashed, failed=True)
    assert tracker.close() is None

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("layout").experiment_id])
    by_role = {}
    for run in runs:
        by_role.setdefault(run.data.tags["samtune.role"], []).append(run)
    (sweep_run,), (cell_run,) = by_role["sweep"], by_role["cell"]
    assert cell_run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
    assert cell_run.data.tags["samtune.cell"] == "noise=0.4"
    assert cell_run.data.params == {
        "scenario": "label_noise",
        "label_noise_rate": "0.4",
        "label_noise_kind": "symmetric",
    }
    trials = {r.data.tags["samtune.trial_key"].rsplit("/", 1)[1]: r for r in by_role["trial"]}
    assert set(trials) == {"finished", "stopped", "diverged", "failed"}
    for name, run in trials.items():
        assert run.data.tags["samtune.status"] == name
        assert run.data.tags["mlflow.parentRunId"] == cell_run.info.run_id
        assert run.data.tags["samtune.trial_key"] == f"layout/{cell.slug}/{name}"
        assert run.info.status == ("FAILED" if name == "failed" else "FINISHED")
        assert run.data.params["label_noise_rate"] == "0.4" and run.data.params["epochs"] == "3"
    assert trials["failed"].data.params["rho"] == "0.1"
    # Named so that a list reads: cell, optimizer, the settings searched, role, place in the search.
    assert {name: run.info.run_name for name, run in trials.items()} == {
        "finished": "noise=0.4 SGD lr=0.1 #0",
        "stopped": "noise=0.4 SGD lr=0.1 #1",
        "diverged": "noise=0.4 SGD lr=0.1 #2",
        "failed": "noise=0.4 SAM lr=0.1 rho=0.1 baseline",
    }
    assert cell_run.info.run_name == "noise=0.4"
    # The sharpness settings are params of the trial, once; only the value and its cost are series.
    finished = trials["finished"].data
    assert {k: v for k, v in finished.params.items() if k.startswith("sharpness/")} == {
        "sharpness/m_sharpness/rho": "0.05",
        "sharpness/m_sharpness/m": "128",
        "sharpness/adaptive_sharpness/norm": "l2",
        "sharpness/seed": "0",
        "sharpness/subset": "256",
        "sharpness/params/head": "1",
    }
    assert {k for k in finished.metrics if k.startswith("sharpness/")} == {
        "sharpness/m_sharpness",
        "sharpness/m_sharpness/seconds",
    }

    def steps(run, key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert steps(trials["finished"], "val_error") == [(1, 0.5), (2, 0.4), (3, 0.3)]
    # The diverged epoch: its bad val_error and diverged=1 are logged, its NaN loss is not.
    assert steps(trials["diverged"], "val_error") == [(1, 0.7), (2, 1.0)]
    assert steps(trials["diverged"], "train_loss") == [(1, 0.7)]
    assert steps(trials["diverged"], "diverged") == [(1, 0.0), (2, 1.0)]
    assert "done" not in trials["finished"].data.metrics  # Tune's bookkeeping stays out


def test_a_trial_restored_after_its_last_epoch_ends_with_its_last_result(tmp_path):
    # The driver was killed between the last epoch's report and Tune's save: the resumed Tune runs
    # the trial again, which restores that epoch's checkpoint and ends without reporting; the
    # driver sees it start and complete, with the result Tune kept.
    sweep = Sweep(
        name="kept", dataset="digits", model="mlp", epochs=3, batch_size=32, trials=2, label_noise_rates=(0.0,)
    )
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", sweep.name, tmp_path / "spool.jsonl")
    tracker.declare("kept", "kept", "sweep")
    (cell,) = sweep.cells()
    recorder = Recorder(sweep, cell, tracker, "kept")
    trial = SimpleNamespace(
        trial_id="sgd",
        config=sweep.trial_config(cell, {"optimizer": "sgd", "lr": 0.1, "trial_number": 0}),
        last_result={"epoch": 3, "val_error": 0.2, "test_error": 0.25, "diverged": 0, "training_iteration": 3},
    )
    recorder.trial_start(trial)
    recorder.trial_end(trial, failed=False)
    assert tracker.close() is None
    row = recorder.result.trials["sgd"]
    assert (row.status, row.epoch, row.metrics["val_error"]) == ("finished", 3, 0.2)
    assert recorder.result.picks("val_error", "min")["best_sgd"] is row


def test_a_picks_model_loads_with_mlflow_and_gives_the_outputs_of_its_checkpoint(tmp_path):
    import mlflow.pytorch
    import torch
    from ray.tune import Checkpoint

    from samtune.models.zoo import build_model

    sweep = Sweep(
        name="picks", dataset="digits", model="mlp", epochs=1, batch_size=32, trials=2, label_noise_rates=(0.0,)
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, sweep.name, tmp_path / "spool.jsonl")
    tracker.declare("picks", "picks", "sweep")
    (cell,) = sweep.cells()
    recorder = Recorder(sweep, cell, tracker, "picks")
    trained = {}
    for number, (optimizer, error) in enumerate((("sgd", 0.3), ("sam", 0.2))):
        trained[optimizer] = build_model("mlp", 10, (1, 8, 8))
        folder = tmp_path / "checkpoints" / optimizer
        folder.mkdir(parents=True)
        # What a trial's checkpoint holds (`samtune.trial.state.checkpoint`), its weights first.
        torch.save({"model": trained[optimizer].state_dict(), "epoch": 1}, folder / "trial.pt")
        trial = SimpleNamespace(
            trial_id=optimizer,
            config=sweep.trial_config(cell, {"optimizer": optimizer, "lr": 0.1, "trial_number": number}),
            checkpoint=Checkpoint.from_directory(str(folder)),
        )
        recorder.trial_start(trial)
        recorder.trial_result(trial, {"epoch": 1, "val_error": error})
        recorder.trial_end(trial, failed=False)
    plan = SimpleNamespace(sweep=sweep, sweep_dir=tmp_path / "runs" / "picks")
    logged = log_pick_models(plan, [recorder.result], tracker, "picks")
    assert tracker.close() is None
    assert [(p.name, p.trial_key) for p in logged] == [
        ("best_sgd", f"picks/{cell.slug}/sgd"),
        ("best_sam", f"picks/{cell.slug}/sam"),
    ]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("picks").experiment_id])
    (cell_run,) = [r for r in runs if r.data.tags["samtune.role"] == "cell"]
    assert cell_run.data.tags["samtune.picks"] == f"best_sgd:picks/{cell.slug}/sgd,best_sam:picks/{cell.slug}/sam"
    by_key = {r.data.tags["samtune.key"]: r.info.run_id for r in runs}
    batch = torch.randn(5, 1, 8, 8)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        for pick in cell_run.data.tags["samtune.picks"].split(","):
            name, trial_key = pick.split(":", 1)
            loaded = mlflow.pytorch.load_model(f"runs:/{by_key[trial_key]}/model")
            weights = trained[trial_key.rsplit("/", 1)[1]].eval()
            assert not loaded.training and torch.equal(loaded(batch), weights(batch)), name
    finally:
        mlflow.set_tracking_uri(before)
    # A resumed driver finds the saved models and logs them again, without building them again.
    saved = plan.sweep_dir / "models" / cell.slug / "sam" / "model" / "MLmodel"
    stamp = saved.stat().st_mtime_ns
    again = Tracker(uri, sweep.name, tmp_path / "spool.jsonl")
    again.declare(f"picks/{cell.slug}", cell.label, "cell", parent="picks")
    for optimizer in trained:
        again.declare(f"picks/{cell.slug}/{optimizer}", optimizer, "trial", parent=f"picks/{cell.slug}")
    assert len(log_pick_models(plan, [recorder.result], again, "picks")) == 2
    assert again.close() is None and saved.stat().st_mtime_ns == stamp


class Unreachable:
    """An MlflowClient stand-in for a tracking server that is down."""

    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise ConnectionError("tracking server unreachable")

        return call


def test_records_a_driver_could_not_write_are_written_by_the_next_driver(tmp_path):
    uri, spool = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "spool.jsonl"
    first = Tracker(uri, "exp", spool, retry_after_s=0.0)
    first.client = Unreachable()
    first.declare("exp", "exp", "sweep")
    first.declare("exp/c", "noise=0", "cell", parent="exp", **{"samtune.cell": "noise=0"})
    first.declare("exp/c/t", "t", "trial", parent="exp/c", **{"samtune.trial_key": "exp/c/t"})
    first.log_params("exp/c/t", {"lr": 0.1})
    for epoch in (1, 2):
        first.log_metrics("exp/c/t", {"epoch": epoch, "val_error": 0.5 / epoch}, step=epoch)
    first.end_open_runs()
    message = first.close()
    assert str(spool) in message and "could not be reached" in message
    # A resumed sweep: a new driver, the server back, the same spool.
    second = Tracker(uri, "exp", spool)
    second.declare("exp/c/t", "t", "trial", parent="exp/c", **{"samtune.trial_key": "exp/c/t"})
    second.log_metrics("exp/c/t", {"epoch": 2, "val_error": 0.25}, step=2)  # replayed: skipped
    second.log_metrics("exp/c/t", {"epoch": 3, "val_error": 0.2}, step=3)
    second.set_status("exp/c/t", "finished")
    assert second.close() is None and not spool.exists()
    client = MlflowClient(uri)
    runs = {
        r.data.tags["samtune.role"]: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    }
    assert set(runs) == {"sweep", "cell", "trial"}
    trial = runs["trial"]
    assert trial.data.tags["mlflow.parentRunId"] == runs["cell"].info.run_id
    assert runs["cell"].data.tags["mlflow.parentRunId"] == runs["sweep"].info.run_id
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "epoch")] == [1, 2, 3]
    assert trial.data.params == {"lr": "0.1"} and trial.data.tags["samtune.status"] == "finished"
    assert trial.info.status == "FINISHED"


def test_the_best_of_a_cell_ran_its_whole_budget_when_any_trial_did():
    sweep = Sweep(name="s", dataset="digits", model="mlp", epochs=4, batch_size=32, trials=4)
    (cell,) = sweep.cells()
    res = CellResult(cell)

    def row(tid, optimizer, status, value):
        res.trials[tid] = TrialRow(
            tid,
            {"optimizer": optimizer},
            status,
            4 if status == "finished" else 1,
            {"val_error": value, "test_error": value},
        )

    # ASHA stopped the SAM trial after one epoch on a value no finished trial reached; the ASAM
    # trial ran all four epochs. The SGD family has only a stopped trial: that one stands.
    row("sam-stopped", "sam", "stopped", 0.05)
    row("asam-finished", "asam", "finished", 0.20)
    row("sam-failed", "sam", "failed", 0.01)
    row("sgd-stopped", "sgd", "stopped", 0.30)
    plan = SimpleNamespace(sweep=sweep)
    (entry,) = summarize(plan, [res])
    assert entry["sam"].trial_id == "asam-finished"
    assert entry["sgd"].trial_id == "sgd-stopped"
    assert res.best("val_error", "min").trial_id == "asam-finished"
    assert res.best("val_error", "min", "sam").trial_id == "sam-stopped"


def test_a_new_sweep_of_the_same_name_gets_new_runs_and_a_resumed_one_its_own(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = prepare(
        str(SPACE), ["name=same", "label_noise_rates=0.4"], storage_path=str(tmp_path / "a"), tracking_uri=uri
    )
    write_state(first)
    first.lock.release()  # its driver has ended (the resumed one below is the next)
    second = prepare(
        str(SPACE), ["name=same", "label_noise_rates=0.4"], storage_path=str(tmp_path / "b"), tracking_uri=uri
    )
    resumed = prepare(str(SPACE), ["name=same", "label_noise_rates=0.4"], storage_path=str(tmp_path / "a"), resume=True)
    assert first.sweep_id and second.sweep_id != first.sweep_id
    # --resume reads the id (and the store) back from sweep.json.
    assert (resumed.sweep_id, resumed.tracking_uri) == (first.sweep_id, uri)

    (cell,) = first.sweep.cells()
    client = MlflowClient(uri)
    for plan, epochs in ((first, (1,)), (second, (1, 2)), (resumed, (2,))):
        tracker = Tracker(uri, plan.sweep.name, tmp_path / "spool.jsonl")
        recorder = Recorder(plan.sweep, cell, tracker, declare_sweep(plan, tracker))
        trial = fake_trial(
            "same_00000", **plan.sweep.trial_config(cell, {"optimizer": "sgd", "lr": 0.1, "trial_number": 0})
        )
        recorder.trial_start(trial)
        for epoch in epochs:  # Tune numbers trials per experiment: the same id in both sweeps
            recorder.trial_result(trial, {"epoch": epoch, "val_error": 0.5})
        assert tracker.close() is None
        if plan is first:
            # The first sweep's runs named as samtune named them before: its resume finds them
            # all the same (by key), and names them as now.
            for run in client.search_runs([client.get_experiment_by_name("same").experiment_id]):
                client.update_run(run.info.run_id, name=f"old name {run.info.run_id}")

    runs = client.search_runs([client.get_experiment_by_name("same").experiment_id])
    by_sweep = {}
    for run in runs:
        by_sweep.setdefault(run.data.tags["samtune.key"].split("/")[0], []).append(run)
    assert set(by_sweep) == {f"same@{first.sweep_id}", f"same@{second.sweep_id}"}
    for key, plan in ((f"same@{first.sweep_id}", first), (f"same@{second.sweep_id}", second)):
        roles = Counter(r.data.tags["samtune.role"] for r in by_sweep[key])
        assert roles == {"sweep": 1, "cell": 1, "trial": 1}
        (sweep_run,) = [r for r in by_sweep[key] if r.data.tags["samtune.role"] == "sweep"]
        assert sweep_run.data.tags["samtune.sweep_id"] == plan.sweep_id
        (trial_run,) = [r for r in by_sweep[key] if r.data.tags["samtune.role"] == "trial"]
        # The resumed driver continued the first sweep's trial run, not the second's.
        assert epochs_logged(client, trial_run) == [1, 2]
        assert sweep_run.info.run_name == f"same {plan.sweep_id}"
        assert trial_run.info.run_name == "noise=0.4 SGD lr=0.1 #0"


def test_no_sweep_json_is_written_when_the_tracking_store_cannot_be_opened(tmp_path, monkeypatch):
    plan = prepare(
        str(SPACE),
        ["name=nostore"],
        storage_path=str(tmp_path / "runs"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    monkeypatch.setattr(samtune.sweep.driver, "start_ray", lambda address: None)
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 2.0})

    def broken(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(samtune.sweep.driver, "Tracker", broken)
    with pytest.raises(SweepError, match="MLflow cannot open it .*database is locked"):
        run_sweep(plan)
    # Nothing that a later run would take for a sweep to resume.
    assert not (plan.sweep_dir / "sweep.json").exists()


def test_sweep_json_is_replaced_whole_and_never_overwritten(tmp_path):
    plan = prepare(
        str(SPACE), ["name=state"], storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"
    )
    write_state(plan)
    saved = json.loads((plan.sweep_dir / "sweep.json").read_text())
    assert saved["sweep_id"] == plan.sweep_id and saved["sweep"]["name"] == "state"
    assert [p.name for p in plan.sweep_dir.iterdir()] == ["sweep.json"]  # no temp file left
    plan.sweep_id = "other"
    write_state(plan)  # a resumed driver keeps what the sweep started with
    assert json.loads((plan.sweep_dir / "sweep.json").read_text())["sweep_id"] == saved["sweep_id"]


def test_a_resume_of_a_changed_search_space_is_refused_saying_what_changed(tmp_path):
    space = tmp_path / "space.py"
    text = SPACE.read_text()
    space.write_text(text)
    where = dict(storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    plan = prepare(str(space), **where)
    write_state(plan)
    plan.lock.release()  # this test's next driver is the resumed one
    # The same file again: resumable. A comment changes nothing the study searches.
    space.write_text(text + "\n# a comment\n")
    prepare(str(space), resume=True, **where).lock.release()
    # Another categorical choice and another range: two search spaces in one study.
    space.write_text(
        text.replace("[8, 16, None]", "[8, 32, None]").replace(
            "0.01, 0.5, log=True)\n    if", "0.001, 0.5, log=True)\n    if"
        )
    )
    with pytest.raises(SweepError) as refused:
        prepare(str(space), resume=True, **where)
    message = str(refused.value)
    assert message.startswith("--resume: the search space changed since the sweep started (")
    assert (
        "m: was CategoricalDistribution(choices=(8, 16, None)), now CategoricalDistribution(choices=(8, 32, "
        "None))" in message
    )
    assert (
        "lr: was FloatDistribution(high=0.5, log=True, low=0.01, step=None), now "
        "FloatDistribution(high=0.5, log=True, low=0.001, step=None)" in message
    )
    assert message.endswith("start a new sweep with --set name=...")


# ------------------------------------------------------------------------------ end to end (slow)


def kill_session(sid):
    """SIGKILL every process left in session `sid` (a driver started with start_new_session)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def sweep_cmd(tmp_path, *extra, name="t"):
    return [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(SPACE),
        "--set",
        f"name={name}",
        "--set",
        "model=mlp",
        "--set",
        "batch_size=128",
        "--set",
        "fixed.sharpness_measures=m_sharpness",
        # The search alone: the confirmation stage has tests of its own (test_confirm.py).
        "--set",
        "confirm_seeds=0",
        "--storage-path",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        *extra,
    ]


def env(**extra):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("RAY_ADDRESS", None)  # a sweep without --address must start its own Ray
    return e


def sweep_space(tmp_path, filename, text):
    """Write a search space file and run `samtune sweep` on it to the end (exit status 0)."""
    space = tmp_path / filename
    space.write_text(text)
    cmd = [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(space),
        "--storage-path",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def runs_of(tmp_path, experiment="t"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("samtune.role"), []).append(r)
    return client, by_role


def epochs_logged(client, run):
    return [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]


@pytest.mark.slow
def test_sweep_records_every_trial_in_the_documented_layout(tmp_path):
    proc = subprocess.run(
        sweep_cmd(tmp_path, "--set", "epochs=2", "--set", "trials=3", "--set", "label_noise_rates=0.0,0.4"),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the search's picks per cell" in proc.stdout and "samtune ui" in proc.stdout
    # Off a terminal the sweep says where it is in plain lines, the stage's last one when it ends.
    assert re.search(r"^search: 6/6 trials ended, \d+/\d+ epochs, \w+ in, done$", proc.stdout, flags=re.M), proc.stdout[
        -3000:
    ]
    # The sweep ends by building its report and saying where it is.
    (index,) = re.findall(r"^Report written to (.+index\.html)$", proc.stdout, flags=re.M)
    # Beside the sweep, in a folder named by its id: another sweep of the name keeps its own.
    assert Path(index).is_file() and re.fullmatch(r"report-[0-9a-f]{8}", Path(index).parent.name)
    assert Path(index).parent.parent == tmp_path / "runs" / "t"
    client, by_role = runs_of(tmp_path)
    (sweep,) = by_role["sweep"]
    cells = by_role["cell"]
    assert sorted(c.data.tags["samtune.cell"] for c in cells) == ["noise=0", "noise=0.4"]
    assert all(c.data.tags["mlflow.parentRunId"] == sweep.info.run_id for c in cells)
    trials = by_role["trial"]
    assert len(trials) == 6
    cell_ids = {c.info.run_id: c.data.tags["samtune.cell"] for c in cells}
    per_cell = Counter(cell_ids[t.data.tags["mlflow.parentRunId"]] for t in trials)
    assert per_cell == {"noise=0": 3, "noise=0.4": 3}
    for t in trials:
        tags, params, metrics = t.data.tags, t.data.params, t.data.metrics
        assert tags["samtune.status"] in ("finished", "stopped")
        assert tags["samtune.cell"] == cell_ids[tags["mlflow.parentRunId"]]
        assert params["dataset"] == "digits" and float(params["label_noise_rate"]) in (0.0, 0.4)
        steps = epochs_logged(client, t)
        assert steps == list(range(1, len(steps) + 1))
        assert {"val_error", "test_error", "train_acc_true", "train_acc_noisy"} <= set(metrics)
        if tags["samtune.status"] == "finished":
            assert steps[-1] == 2 and "sharpness/m_sharpness" in metrics
            # Its settings are params, once; the value and its cost are the metrics.
            assert params["sharpness/m_sharpness/rho"] == "0.05" and params["sharpness/seed"] == "0"
            assert not {"sharpness/m_sharpness/rho", "sharpness/seed", "sharpness/subset"} & set(metrics)
            assert "sharpness/m_sharpness/seconds" in metrics
        # Named so that the UI's list reads: cell, optimizer, what was searched, its number.
        assert re.fullmatch(r"noise=0(\.4)? (SGD|SAM) lr=\S+( rho=\S+ m=\S+)?( baseline)? #[0-2]", t.info.run_name), (
            t.info.run_name
        )
    # The report, built from these runs, still draws the sharpness view.
    assert (Path(index).parent / "sharpness.png").is_file()
    # Each cell's run names its picks, whose runs hold their final weights as MLflow models.
    trial_keys = {t.data.tags["samtune.trial_key"] for t in trials}
    for cell in cells:
        picks = dict(pick.split(":", 1) for pick in cell.data.tags["samtune.picks"].split(","))
        assert set(picks) == {"best_sgd", "best_sam"} and set(picks.values()) <= trial_keys
    # Every cell carries its own SGD baseline beside SAM.
    for cell in cells:
        kids = [t for t in trials if t.data.tags["mlflow.parentRunId"] == cell.info.run_id]
        assert {"sgd", "sam"} <= {t.data.params["optimizer"] for t in kids}
    # Each cell's Optuna study holds every trial, with the values MLflow has for it.
    sweep = Sweep(
        name="t", dataset="digits", model="mlp", epochs=2, batch_size=128, trials=3, label_noise_rates=(0.0, 0.4)
    )
    for cell in sweep.cells():
        study = load_study(tmp_path / "runs" / "t", cell)
        assert len(study.trials) == 3
        assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
        logged = sorted(
            (t.data.params["optimizer"], float(t.data.params["lr"]))
            for t in trials
            if t.data.tags["samtune.cell"] == cell.label
        )
        assert sorted((t.params["optimizer"], t.params["lr"]) for t in study.trials) == logged
    # One Tuner runs both cells: the trial processes that served the first cell serve the second
    # (Tune reports each result's process id), so no cell pays for new processes importing torch.
    from ray.tune import ExperimentAnalysis

    pids = {}
    for trial in ExperimentAnalysis(str(tmp_path / "runs" / "t" / "trials")).trials:
        pids.setdefault(trial.config["label_noise_rate"], set()).add(trial.last_result["pid"])
    assert pids[0.0] & pids[0.4], pids
    assert len(pids[0.0] | pids[0.4]) <= 2, pids


@pytest.mark.slow
def test_asha_stops_a_trial_that_is_behind_at_its_rung(tmp_path):
    # Trials are suggested one at a time (search_batch=1: each judged against every earlier one)
    # and alternate a working and a hopeless learning rate: each hopeless trial reaches the first
    # rung (epoch 1) behind a recorded working one, so ASHA stops it there.
    sweep_space(
        tmp_path,
        "asha.py",
        "from samtune.sweep import Sweep\n"
        "def space(trial):\n"
        "    trial.suggest_categorical('optimizer', ['sgd'])\n"
        "    return {'lr': 0.2 if trial.number % 2 == 0 else 1e-6}\n"
        "SWEEP = Sweep(name='t', dataset='digits', model='mlp', epochs=2, batch_size=128, trials=4,\n"
        "              grace_period=1, reduction_factor=2, max_concurrent=1, search_batch=1,\n"
        "              fixed={'sharpness_measures': ''})\n",
    )
    client, by_role = runs_of(tmp_path)
    status = Counter((float(t.data.params["lr"]), t.data.tags["samtune.status"]) for t in by_role["trial"])
    assert status == {(0.2, "finished"): 2, (1e-6, "stopped"): 2}
    for t in by_role["trial"]:
        expected = [1, 2] if t.data.tags["samtune.status"] == "finished" else [1]
        assert epochs_logged(client, t) == expected
    (cell,) = Sweep(name="t", dataset="digits", model="mlp", epochs=2, batch_size=128, trials=4).cells()
    study = load_study(tmp_path / "runs" / "t", cell)
    assert Counter(t.state for t in study.trials) == {TrialState.COMPLETE: 2, TrialState.PRUNED: 2}
    # A pruned trial carries the value of the epoch ASHA stopped it at, for TPE to rank it by.
    for t in study.trials:
        if t.state == TrialState.PRUNED:
            assert list(t.intermediate_values) == [1] and t.value == t.intermediate_values[1]


def wait_for_finished_trials(tmp_path, count, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"the sweep ended (exit {proc.returncode}) before it could be interrupted:\n"
                + (proc.stdout.read() if proc.stdout else "")[-3000:]
            )
        # Once sweep.json is written the sweep's store exists whole: opening a store that is
        # still being created would race its table migrations.
        if (tmp_path / "runs" / "t" / "sweep.json").exists():
            try:
                _, by_role = runs_of(tmp_path)
            except Exception:  # noqa: BLE001  the sweep is still creating its store: look again
                by_role = {}
            done = [t for t in by_role.get("trial", []) if t.data.tags.get("samtune.status") != "running"]
            if len(done) >= count:
                return
        time.sleep(2)
    raise AssertionError("no trial finished in time")


def check_complete_once(tmp_path, trials_per_cell, cells):
    client, by_role = runs_of(tmp_path)
    trials = by_role["trial"]
    keys = [t.data.tags["samtune.trial_key"] for t in trials]
    assert len(keys) == len(set(keys)), "a trial appears twice in MLflow"
    assert len(by_role["cell"]) == cells and len(by_role["sweep"]) == 1
    assert len(trials) == trials_per_cell * cells, sorted(keys)
    for t in trials:
        assert t.data.tags["samtune.status"] in ("finished", "stopped", "diverged"), t.data.tags
        steps = epochs_logged(client, t)
        assert steps == list(range(1, len(steps) + 1)), f"gap or duplicate in {steps}"
    rejected = list(tmp_path.rglob("*.rejected.jsonl"))
    assert not rejected, rejected[0].read_text()[:2000]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_sweep_resumes_without_losing_or_repeating_trials(tmp_path, how):
    # Epochs enough that the signal, sent once 2 of the 8 trials ended, always lands mid-sweep.
    args = ("--set", "epochs=5", "--set", "trials=4", "--set", "label_noise_rates=0.0,0.4")
    proc = subprocess.Popen(
        sweep_cmd(tmp_path, *args),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_finished_trials(tmp_path, 2, proc)
        if how in ("SIGINT", "SIGTERM"):
            # SIGTERM (kill, systemd, Kubernetes, Slurm) ends a sweep as Ctrl-C does.
            proc.send_signal(getattr(signal, how))
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 130, out[-3000:]
            # Resumed below with the very command it printed (the store comes from sweep.json).
            hint = [line for line in out.splitlines() if line.rstrip().endswith("--resume")][-1]
            printed = shlex.split(hint.split("with: ", 1)[1])
            assert printed[:2] == ["samtune", "sweep"], hint
            resume_cmd = [sys.executable, "-m", "samtune.cli", *printed[1:], "--no-report"]
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how == "SIGKILL":
        # The killed driver's Ray processes, and only those (its session): `ray stop` would also
        # stop every other Ray instance on the machine, another job's included.
        kill_session(proc.pid)
    if how == "SIGKILL":
        resume_cmd = sweep_cmd(tmp_path, *args, "--resume", "--no-report")
    resumed = subprocess.run(resume_cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    check_complete_once(tmp_path, trials_per_cell=4, cells=2)
    # The Optuna searcher continued where it stopped: each cell's study holds the budget's trials,
    # numbered in order, all ended, and the SGD/SAM starting points (points_to_evaluate) were
    # asked once, not again by the resumed driver.
    sweep = Sweep(
        name="t", dataset="digits", model="mlp", epochs=5, batch_size=128, trials=4, label_noise_rates=(0.0, 0.4)
    )
    for cell in sweep.cells():
        study = load_study(tmp_path / "runs" / "t", cell)
        assert [t.number for t in study.trials] == [0, 1, 2, 3], [(t.number, t.state) for t in study.trials]
        assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}, [
            (t.number, t.state) for t in study.trials
        ]
        enqueued = [
            (t.number, t.system_attrs["fixed_params"]) for t in study.trials if "fixed_params" in t.system_attrs
        ]
        # The declared baselines: SGD, and SAM at the paper's rho and m, the rest at its defaults.
        assert enqueued == [
            (0, {"optimizer": "sgd", "lr": 0.05}),
            (1, {"optimizer": "sam", "lr": 0.05, "rho": 0.05, "m": None}),
        ]


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_exits_non_zero_saying_why(tmp_path):
    # No restarts allowed, and every trial raises after its first epoch.
    proc = subprocess.run(
        sweep_cmd(
            tmp_path,
            "--set",
            "epochs=2",
            "--set",
            "trials=2",
            "--set",
            "label_noise_rates=0.0",
            "--set",
            "fixed.max_failures=0",
        ),
        cwd=tmp_path,
        env=env(SAMTUNE_FAULT_RAISE_EPOCH="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "samtune: every trial of the sweep failed; the first: RuntimeError: injected fault after epoch 1" in proc.stderr
    ), proc.stderr[-3000:]
    _, by_role = runs_of(tmp_path)
    assert [t.data.tags["samtune.status"] for t in by_role["trial"]] == ["failed", "failed"]
    assert all(t.data.tags.get("samtune.error") for t in by_role["trial"])


@pytest.mark.slow
def test_a_trial_killed_on_its_last_allowed_failure_fails_the_sweep_rather_than_interrupting_it(tmp_path):
    # No restarts allowed, and the trial's process is SIGKILLed after its first epoch: Tune saves
    # such a trial as still RUNNING, which read as "interrupted" (exit 130) on every --resume.
    proc = subprocess.run(
        sweep_cmd(
            tmp_path,
            "--set",
            "epochs=2",
            "--set",
            "trials=1",
            "--no-report",
            "--set",
            "label_noise_rates=0.0",
            "--set",
            "fixed.max_failures=0",
        ),
        cwd=tmp_path,
        env=env(SAMTUNE_FAULT_KILL_EPOCH="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "samtune: every trial of the sweep failed; the first: The actor is dead" in proc.stderr
    _, by_role = runs_of(tmp_path)
    assert [t.data.tags["samtune.status"] for t in by_role["trial"]] == ["failed"]
    (state_file,) = (tmp_path / "runs" / "t" / "trials").glob("experiment_state-*.json")
    statuses = [json.loads(t[0])["status"] for t in json.loads(state_file.read_text())["trial_data"]]
    assert statuses == ["ERROR"]  # what --resume reads: nothing left to run


@pytest.mark.slow
def test_a_running_sweep_refuses_a_second_driver_and_a_killed_one_resumes(tmp_path):
    # One trial long enough that both refusals land while it trains.
    args = (
        "--set",
        "epochs=60",
        "--set",
        "trials=1",
        "--set",
        "label_noise_rates=0.0",
        "--set",
        "fixed.sharpness_measures=",
    )
    proc = subprocess.Popen(
        sweep_cmd(tmp_path, *args),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "runs" / "t" / "trials").glob("*/progress.csv")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        # A second driver of the running sweep, new or resuming, is refused in one line, naming it.
        for extra in ((), ("--resume",)):
            second = subprocess.run(
                sweep_cmd(tmp_path, *args, *extra), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300
            )
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            assert re.fullmatch(
                rf"samtune: error: sweep 't' is already running \(driver pid {proc.pid} on "
                rf"\S+ since [0-9: -]+\); wait for it to end, or stop it and finish it with "
                rf"--resume\n",
                second.stderr,
            ), second.stderr
        assert proc.poll() is None, "the sweep ended before the second drivers were refused"
        # The driver alone, as `kill -9 PID` does: its Ray processes are left to notice.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    # The killed driver holds nothing, and what its Ray left running (its agents outlive it by
    # up to a minute, still listening) does not confuse the next driver: --resume, started at
    # once, finishes the sweep.
    resumed = subprocess.run(
        sweep_cmd(tmp_path, *args, "--resume", "--no-report"),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    check_complete_once(tmp_path, trials_per_cell=1, cells=1)
    # And nothing of the killed driver's Ray stays behind for long.
    deadline = time.time() + 120
    while (left := _live_processes_of_group(proc.pid)) and time.time() < deadline:
        time.sleep(2)
    assert left == [], left


def _live_processes_of_group(group: int) -> list[str]:
    ps = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "-g", str(group)], capture_output=True, text=True)
    return [line for line in ps.stdout.splitlines() if not line.split()[1].startswith("Z")]


@pytest.mark.slow
def test_a_killed_worker_restarts_from_its_checkpoint_into_the_same_run(tmp_path):
    proc = subprocess.run(
        sweep_cmd(
            tmp_path,
            "--set",
            "epochs=3",
            "--set",
            "trials=1",
            "--set",
            "label_noise_rates=0.2",
            "--set",
            "grace_period=3",
        ),
        cwd=tmp_path,
        env=env(SAMTUNE_FAULT_KILL_EPOCH="2"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from ray.tune import ExperimentAnalysis

    # The fault happened: Tune saw the trial's process die once and restarted it. Had it trained
    # from scratch it would have reached epoch 2 again and been killed until its restarts ran out.
    (cell,) = Sweep(
        name="t", dataset="digits", model="mlp", epochs=3, batch_size=128, trials=1, label_noise_rates=(0.2,)
    ).cells()
    (tune_trial,) = ExperimentAnalysis(str(tmp_path / "runs" / "t" / "trials")).trials
    assert tune_trial.status == "TERMINATED" and tune_trial.num_failures == 1
    client, by_role = runs_of(tmp_path)
    (trial,) = by_role["trial"]
    assert trial.data.tags["samtune.status"] == "finished"
    assert epochs_logged(client, trial) == [1, 2, 3]
    history = client.get_metric_history(trial.info.run_id, "test_error")
    assert sorted(m.step for m in history) == [1, 2, 3]


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_as_diverged_and_the_sweep_goes_on(tmp_path):
    sweep_space(
        tmp_path,
        "diverge.py",
        "from samtune.sweep import Sweep\n"
        "def space(trial):\n"
        "    opt = trial.suggest_categorical('optimizer', ['sgd', 'sam'])\n"
        "    if opt == 'sam':\n"
        "        return {'rho': 5.0, 'lr': 10.0}\n"
        "    return {'lr': 0.05}\n"
        "SWEEP = Sweep(name='t', dataset='digits', model='mlp', epochs=3, batch_size=128, trials=2,\n"
        "              grace_period=3, fixed={'sharpness_measures': ''})\n",
    )
    client, by_role = runs_of(tmp_path)
    status = {t.data.params["optimizer"]: t for t in by_role["trial"]}
    assert status["sam"].data.tags["samtune.status"] == "diverged"
    assert status["sam"].data.metrics["diverged"] == 1.0
    assert "train_loss" not in status["sam"].data.metrics or all(
        m.value == m.value for m in client.get_metric_history(status["sam"].info.run_id, "train_loss")
    )
    assert status["sgd"].data.tags["samtune.status"] == "finished"
    # It ended by itself, before its budget of 3 epochs, and ASHA did not stop it (grace_period=3).
    steps = epochs_logged(client, status["sam"])
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 3
    # Optuna saw a bad result, not a pruned or failed trial: TPE learns to avoid that region.
    (cell,) = Sweep(name="t", dataset="digits", model="mlp", epochs=3, batch_size=128, trials=2).cells()
    by_optimizer = {t.params["optimizer"]: t for t in load_study(tmp_path / "runs" / "t", cell).trials}
    assert (by_optimizer["sam"].state, by_optimizer["sam"].value) == (TrialState.COMPLETE, 1.0)
    assert by_optimizer["sgd"].state == TrialState.COMPLETE and by_optimizer["sgd"].value < 1.0


def test_the_summary_marks_a_best_pick_that_asha_stopped():
    from io import StringIO

    from rich.console import Console

    from samtune.sweep.results import TrialRow
    from samtune.sweep.view import print_summary

    def row(optimizer, status, epoch, val, test):
        return TrialRow(
            "t",
            {"optimizer": optimizer, "lr": 0.1},
            status=status,
            epoch=epoch,
            metrics={"val_error": val, "test_error": test, "epoch": epoch},
        )

    rows = [
        {
            "cell": "noise=0.4",
            "sgd": row("sgd", "finished", 16, 0.5, 0.3),
            "sam": row("sam", "finished", 16, 0.4, 0.1),
            "failed": 0,
            "diverged": 0,
        },
        {
            "cell": "noise=0.8",
            "sgd": row("sgd", "finished", 16, 0.8, 0.6),
            "sam": row("sam", "stopped", 4, 0.9, 0.9),
            "failed": 0,
            "diverged": 0,
        },
    ]
    plan = SimpleNamespace(sweep=SimpleNamespace(name="s", metric="val_error", seed=0), tracking_uri="sqlite:///x.db")
    out = StringIO()
    print_summary(Console(file=out, width=250, color_system=None), plan, rows)
    # Single runs: said so, and no colour that would read as a win beside the verdicts.
    assert "one run each on seed 0: no interval, not a verdict" in " ".join(out.getvalue().split())
    coloured = StringIO()
    print_summary(Console(file=coloured, width=250, force_terminal=True, color_system="standard"), plan, rows[:1])
    (line,) = [line for line in coloured.getvalue().splitlines() if "-0.200" in line]
    assert "\x1b[32m-0.200" not in line and "\x1b[31m" not in line
    lines = out.getvalue().splitlines()
    (finished,) = [line for line in lines if "noise=0.4" in line]
    (stopped,) = [line for line in lines if "noise=0.8" in line]
    assert "*" not in finished and "-0.200" in finished
    assert "0.9 (ep 4)*" in stopped and "0.6" in stopped and "(ep" not in stopped.split("0.9 (ep 4)*")[0]
    assert any(line.startswith("* no trial of that optimizer ran the whole budget") for line in lines)


def test_superseded_checkpoints_go_only_once_no_saved_state_can_name_them(tmp_path):
    """Against Tune's own checkpoint bookkeeping, driven as its controller drives it: the
    callback sees checkpoint N+1 first, then Tune registers it."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from samtune.sweep.recovery import CheckpointPruner

    manager = _CheckpointManager(CheckpointConfig(num_to_keep=None))
    trial = SimpleNamespace(run_metadata=SimpleNamespace(checkpoint_manager=manager))
    (tmp_path / "progress.csv").write_text("epoch\n")
    for n in range(6):
        folder = tmp_path / f"checkpoint_{n:06d}"
        folder.mkdir()
        (folder / "trial.pt").write_bytes(b"x")
        checkpoint = Checkpoint.from_directory(str(folder))
        # What the state on disk lists at this moment: it was written after the last registration.
        on_disk = [Path(r.checkpoint.path).name for r in manager._checkpoint_results]
        CheckpointPruner().on_checkpoint(n, [], trial, checkpoint)
        if on_disk:  # the state's latest checkpoint is still there to resume from
            assert (tmp_path / on_disk[-1]).exists()
        manager.register_checkpoint(_TrainingResult(checkpoint=checkpoint, metrics={"epoch": n + 1}))
        listed = [Path(r.checkpoint.path).name for r in manager._checkpoint_results]
        assert listed == [f"checkpoint_{k:06d}" for k in range(max(0, n - 1), n + 1)]
        assert Path(manager.latest_checkpoint_result.checkpoint.path) == folder
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint_000004", "checkpoint_000005", "progress.csv"]
    # In object storage, the old ones go through the checkpoint's own filesystem, not the local disk.
    deleted = []
    bucket = SimpleNamespace(type_name="s3", delete_dir=deleted.append)
    remote = SimpleNamespace(path=str(tmp_path / "checkpoint_000006"), filesystem=bucket)
    CheckpointPruner().on_checkpoint(6, [], trial, remote)
    assert deleted == [str(tmp_path / "checkpoint_000004")]
    assert (tmp_path / "checkpoint_000004").exists()


def test_a_state_cut_short_by_a_kill_is_put_back_from_the_copy_of_the_step_before(tmp_path):
    from samtune.sweep.recovery import STATE_BACKUP, StateBackup, resumable

    cell = tmp_path / "trials"
    cell.mkdir()
    (cell / "tuner.pkl").write_bytes(b"")
    older = cell / "experiment_state-2026-01-01_00-00-00.json"
    older.write_text('{"session": 1}')
    state = cell / "experiment_state-2026-01-02_00-00-00.json"
    state.write_text('{"step": 41}')
    StateBackup(str(cell)).on_step_begin(41, [])  # the copy of the newest, as the step begins
    assert (cell / STATE_BACKUP).read_text() == '{"step": 41}'
    state.write_text('{"trial_data": [["{\\"trial_id')  # the write of step 41, cut short
    assert resumable(cell)
    assert json.loads(state.read_text()) == {"step": 41}
    # Cut short with no copy yet (the very first step): nothing to resume, the trials start afresh.
    (cell / STATE_BACKUP).unlink()
    state.write_text("")
    assert not resumable(cell) and not state.exists() and older.exists()


def test_trials_the_driver_saw_fail_are_saved_as_failed_and_no_other(tmp_path):
    from samtune.sweep.recovery import settle_failed_trials

    def trial(trial_id, status):
        return [json.dumps({"trial_id": trial_id, "status": status, "config": {"lr": 0.1}}), "{}"]

    state = tmp_path / "experiment_state-2026-01-02_00-00-00.json"
    state.write_text(
        json.dumps(
            {"trial_data": [trial("a", "RUNNING"), trial("b", "RUNNING"), trial("c", "TERMINATED")], "runner_data": {}}
        )
    )
    # "a" died on its last allowed failure; "b" is still training; "c" finished.
    assert settle_failed_trials(tmp_path, {"a", "c"}) == state  # the file it changed
    saved = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
    assert [(t["trial_id"], t["status"]) for t in saved] == [("a", "ERROR"), ("b", "RUNNING"), ("c", "TERMINATED")]
    assert saved[0]["config"] == {"lr": 0.1}
    assert settle_failed_trials(tmp_path, {"a"}) is None  # already settled: the file is left alone


def test_a_sweep_killed_as_its_tuner_started_starts_afresh_on_resume(tmp_path):
    from samtune.sweep.recovery import resumable

    cell = tmp_path / "trials"
    cell.mkdir()
    assert not resumable(cell)
    (cell / "tuner.pkl").write_bytes(b"")
    assert not resumable(cell)  # Tune would refuse: no experiment state yet
    (cell / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    assert resumable(cell)


@pytest.mark.slow
def test_the_embedded_finetuning_study_pretrains_once_and_finetunes_every_trial(tmp_path):
    """search_spaces/finetune_digits.py shrunk: digits 5-9 finetuned from a CNN pretrained on 0-4,
    pretrained once for all trials of both cells (and cached for the next sweep)."""
    space = ROOT / "search_spaces" / "finetune_digits.py"
    cache = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(space),
        "--set",
        "name=t",
        "--set",
        "epochs=2",
        "--set",
        "trials=2",
        "--set",
        "fixed.pretrain_epochs=2",
        "--set",
        "fixed.sharpness_measures=m_sharpness",
        "--storage-path",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--no-report",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env(SAMTUNE_CACHE_DIR=str(cache)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, by_role = runs_of(tmp_path)
    trials = by_role["trial"]
    assert len(trials) == 4
    for t in trials:
        assert t.data.tags["samtune.status"] in ("finished", "stopped")
        assert t.data.params["scenario"] == "finetune" and t.data.params["dataset"] == "digits[5-9]"
        assert t.data.params["finetune_source"] == "digits[0-4]"
        assert "lr_backbone" in t.data.metrics  # the pretrained layers had their own learning rate
        # The starting point (pretrained backbone, fitted head) logged once, before training.
        start = client.get_metric_history(t.info.run_id, "pretrained_test_error")
        assert [m.step for m in start] == [1] and start[0].value < 0.8  # chance: 5 classes
        if t.data.tags["samtune.status"] == "finished":
            assert "sharpness/m_sharpness" in t.data.metrics  # measured with frozen BatchNorm statistics
    (weights,) = (cache / "pretrained").glob("*.pt")
    meta = json.loads(weights.with_name(weights.name + ".json").read_text())
    assert meta["config"]["dataset"] == "digits[0-4]" and meta["config"]["epochs"] == 2
    # One backbone and one draw of labels per cell: every trial of a cell starts from the same point.
    starts = defaultdict(set)
    for t in trials:
        starts[t.data.tags["samtune.cell"]].add(round(t.data.metrics["pretrained_test_error"], 6))
    assert sorted(starts) == ["noise=0", "noise=0.4"] and all(len(v) == 1 for v in starts.values())

"""The deterministic search: every suggestion and every early stop a function of results alone,
whatever order trials end in and however many run at once."""

import heapq
import random

import numpy as np
import pytest
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

from samtune.sweep.rungs import BatchedASHA, rungs, stops
from samtune.sweep.search import CellSearch


class Remembering(Searcher):
    """A searcher whose every suggestion encodes everything it was told before: any change in
    what it had seen when asked (order, timing) shows in the configs."""

    def __init__(self):
        super().__init__(metric="v", mode="min")
        self.told: list[float] = []
        self.asked = 0

    def suggest(self, trial_id):
        self.asked += 1
        return {"x": self.asked, "seen": tuple(sorted(self.told))}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append(result["v"])


def simulate(cells: int, trials: int, batch: int | None, slots: int, seed: int) -> dict:
    """Drive a CellSearch as Tune does: fill free slots, end the trial due first (random
    durations), repeat. Returns (cell, trial number) -> config."""
    search = CellSearch([Remembering() for _ in range(cells)], trials, metric="v", mode="min", baselines=1, batch=batch)
    rng = random.Random(seed)
    running: list[tuple[float, int, str]] = []
    configs, now, made, finished = {}, 0.0, 0, False
    while True:
        while not finished and len(running) < slots:
            trial_id = f"t{made}"
            config = search.suggest(trial_id)
            if config == Searcher.FINISHED:
                finished = True
            elif config is None:
                break
            else:
                made += 1
                configs[trial_id] = config
                heapq.heappush(running, (now + rng.expovariate(1.0), made, trial_id))
        if not running:
            break
        now, _, trial_id = heapq.heappop(running)
        config = configs[trial_id]
        # A result that depends on the config only, as a seeded trial's does.
        value = (hash((config["x"], config["seen"])) % 1000) / 1000
        search.on_trial_complete(trial_id, {"v": value})
    cell_of = search.cell_of
    return {(cell_of[t], c["trial_number"]): (c["x"], c["seen"], c["baseline"]) for t, c in configs.items()}


def test_batched_suggestions_do_not_depend_on_timing_or_how_many_run_at_once():
    reference = simulate(cells=3, trials=7, batch=2, slots=1, seed=0)
    assert len(reference) == 21 and {n for _, n in reference} == set(range(7))
    for slots, seed in [(2, 1), (3, 2), (5, 3), (8, 4), (2, 5)]:
        assert simulate(cells=3, trials=7, batch=2, slots=slots, seed=seed) == reference


def test_each_batch_is_suggested_from_every_earlier_batch_and_nothing_else():
    configs = simulate(cells=1, trials=5, batch=2, slots=3, seed=7)
    seen = {n: len(configs[(0, n)][1]) for n in range(5)}
    assert seen == {0: 0, 1: 0, 2: 2, 3: 2, 4: 4}
    assert [configs[(0, n)][2] for n in range(5)] == [True, False, False, False, False]


def test_asynchronous_suggestions_do_depend_on_timing():
    """The control: without batches the same simulation gives other suggestions."""
    runs = {tuple(sorted(simulate(cells=1, trials=7, batch=None, slots=s, seed=s).items())) for s in (1, 2, 3)}
    assert len(runs) > 1


def test_rungs_are_ashas():
    assert rungs(max_t=16, grace_period=4, reduction_factor=2) == [4, 8]
    assert rungs(max_t=27, grace_period=1, reduction_factor=3) == [1, 3, 9]
    assert rungs(max_t=4, grace_period=4, reduction_factor=2) == []


@pytest.mark.parametrize("mode", ["min", "max"])
def test_the_cutoff_is_ray_ashas(mode):
    """Against Ray's own ASHA bracket: the same peers, the same verdict."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    rng = np.random.default_rng(0)
    for rf in (2, 3, 4):
        for _ in range(200):
            peers = list(rng.uniform(size=rng.integers(1, 9)))
            value = float(rng.uniform())
            bracket = _Bracket(min_t=1, max_t=10, reduction_factor=rf, s=0)
            # Ray's brackets maximise: a min-mode metric enters negated.
            sign = -1.0 if mode == "min" else 1.0
            cutoff = bracket.cutoff({i: sign * p for i, p in enumerate(peers)})
            assert stops(value, peers, mode, rf) == (sign * value < cutoff)


class FakeTrial:
    def __init__(self, trial_id, baseline=False):
        self.trial_id, self.config = trial_id, {"baseline": baseline}


def test_a_trial_is_judged_only_against_earlier_batches():
    search = CellSearch([Remembering()], 6, metric="v", mode="min", batch=2)
    ids = []
    for n in range(6):
        ids.append(f"t{n}")
        search.numbers[f"t{n}"] = (0, n)
    asha = BatchedASHA(search, max_t=16, grace_period=4, reduction_factor=2, metric="val_error", mode="min")

    def judge(n, value):
        return asha.on_trial_result(None, FakeTrial(ids[n]), {"epoch": 4, "val_error": value})

    # Batch 0 has no earlier batch: however bad, it runs on; its partner's result is no peer.
    assert judge(1, 0.9) == FIFOScheduler.CONTINUE
    assert judge(0, 0.95) == FIFOScheduler.CONTINUE
    # Batch 1 against batch 0's {0.95, 0.9} only: 0.92 is worse than their median.
    assert judge(3, 0.1) == FIFOScheduler.CONTINUE
    assert judge(2, 0.93) == FIFOScheduler.STOP
    # Batch 2 against batches 0 and 1: {0.95, 0.9, 0.1, 0.93}, median 0.915.
    assert judge(4, 0.91) == FIFOScheduler.CONTINUE
    assert judge(5, 0.92) == FIFOScheduler.STOP
    # Not a rung: no verdict.
    assert asha.on_trial_result(None, FakeTrial(ids[5]), {"epoch": 5, "val_error": 1.0}) == FIFOScheduler.CONTINUE
    # A baseline is recorded at its rung but never stopped.
    search.numbers["b"] = (0, 4)
    assert (
        asha.on_trial_result(None, FakeTrial("b", baseline=True), {"epoch": 8, "val_error": 1.0})
        == FIFOScheduler.CONTINUE
    )
    assert search.rungs[0][8] == {4: 1.0}


# -- the proof: the same sweep, one trial at a time and two at once on a busy machine ------------

RERUN_SPACE = """
from samtune.sweep import Sweep


def space(trial):
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
    trial.suggest_float("lr", 0.02, 0.5, log=True)
    if optimizer == "sam":
        trial.suggest_float("rho", 0.01, 0.5, log=True)
    return {"momentum": 0.9}


SWEEP = Sweep(name="t", dataset="digits", model="mlp", label_noise_rates=(0.0, 0.4), epochs=4,
              batch_size=64, trials=6, seed=3, grace_period=1, reduction_factor=2, search_batch=2,
              confirm_seeds=3, max_confirm_seeds=5, equivalence_margin=0.01, data_subset=600,
              fixed={"sharpness_measures": ""})
"""


def _sweep_table(folder):
    """Everything a sweep decided, read back from MLflow: each trial's settings, how it ended,
    its epochs and per-epoch errors; each confirmation run's errors; the verdicts."""
    from test_sweep import runs_of

    client, by_role = runs_of(folder)
    cells = {c.info.run_id: c.data.tags["samtune.cell"] for c in by_role["cell"]}
    trials = {}
    for run in by_role["trial"]:
        params = {k: v for k, v in run.data.params.items() if k not in ("data_root",)}
        history = {
            m: [(h.step, round(h.value, 10)) for h in client.get_metric_history(run.info.run_id, m)]
            for m in ("val_error", "test_error", "train_loss")
        }
        trials[(cells[run.data.tags["mlflow.parentRunId"]], int(params["trial_number"]))] = (
            params,
            run.data.tags["samtune.status"],
            history,
        )
    reruns = {
        (cells[r.data.tags["mlflow.parentRunId"]], r.data.tags["samtune.confirms"], r.data.tags["samtune.seed"]): round(
            r.data.metrics["test_error"], 10
        )
        for r in by_role.get("confirm", [])
    }
    (verdicts,) = folder.glob("runs/t/verdicts/verdicts.md")
    return trials, reruns, verdicts.read_text()


@pytest.mark.slow
def test_the_same_sweep_gives_the_same_answer_one_trial_at_a_time_and_two_at_once_on_a_busy_machine(
    tmp_path, busy_machine
):
    import subprocess
    import sys

    from test_sweep import env

    space = tmp_path / "space.py"
    space.write_text(RERUN_SPACE)
    tables = []
    for name, concurrent in (("one", 1), ("two", 2)):
        folder = tmp_path / name
        folder.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "samtune.cli",
            "sweep",
            str(space),
            "--set",
            f"max_concurrent={concurrent}",
            "--storage-path",
            str(folder / "runs"),
            "--tracking-uri",
            f"sqlite:///{folder}/mlflow.db",
        ]
        proc = subprocess.run(cmd, cwd=folder, env=env(), capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        tables.append(_sweep_table(folder))
    (trials_one, reruns_one, verdicts_one), (trials_two, reruns_two, verdicts_two) = tables
    assert len(trials_one) == 12 and sorted(trials_one) == sorted(trials_two)
    for key in trials_one:
        params_one, status_one, history_one = trials_one[key]
        params_two, status_two, history_two = trials_two[key]
        params_two = {k: v for k, v in params_two.items() if k != "max_concurrent"}
        assert (params_one, status_one, history_one) == (params_two, status_two, history_two), key
    # Early stopping did stop something, so the comparison covers its decisions too.
    assert any(status == "stopped" for _, status, _ in trials_one.values())
    assert reruns_one == reruns_two and len(reruns_one) >= 18
    assert verdicts_one == verdicts_two and "look" in verdicts_one

"""Sweeps with Ray Train workers: several cells and workers in one sweep, and worker groups that
cannot be placed."""
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from test_sweep import env, epochs_logged, runs_of

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "search_spaces" / "noisy_digits.py"


@pytest.mark.slow
def test_the_embedded_study_with_two_workers_finishes_every_trial_of_every_cell(tmp_path):
    """The main job's shape: all cells share one Tuner, each trial runs a 2-worker TorchTrainer.
    The trial after the first used to fail ("Could not re-use actor") or wait forever."""
    cmd = [sys.executable, "-m", "samtune.cli", "sweep", str(EMBEDDED), "--set", "name=t",
           "--set", "epochs=2", "--set", "trials=2", "--set", "workers=2",
           "--set", "label_noise_rates=0.0,0.4", "--set", "fixed.sharpness_measures=m_sharpness",
           "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Could not re-use actor" not in out
    client, by_role = runs_of(tmp_path)
    cells = {c.info.run_id: c.data.tags["samtune.cell"] for c in by_role["cell"]}
    trials = by_role["trial"]
    assert Counter(cells[t.data.tags["mlflow.parentRunId"]] for t in trials) == {"noise=0": 2, "noise=0.4": 2}
    for t in trials:
        assert t.data.tags["samtune.status"] in ("finished", "stopped"), t.data.tags
        steps = epochs_logged(client, t)
        assert steps == list(range(1, len(steps) + 1)) and steps
        assert t.data.params["workers"] == "2"
        if t.data.params["optimizer"] == "sam":
            # Both workers trained, each perturbing on its own: 64 examples split 32 + 32, and
            # one worker behind each eps (per-worker m-sharpness).
            assert t.data.metrics["m_per_worker_batch"] == 32 and t.data.metrics["m_workers"] == 1
        if t.data.tags["samtune.status"] == "finished":
            assert steps[-1] == 2 and "sharpness/m_sharpness" in t.data.metrics


@pytest.fixture
def two_cpu_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_a_worker_group_that_cannot_be_placed_fails_its_trial_with_the_missing_resources(two_cpu_ray, tmp_path):
    """The cluster's totals admit the trial (so the driver's check passes), but another job holds
    the CPU its workers need: the trial fails after placement_timeout_s, naming what it waited for,
    instead of waiting forever."""
    from ray import tune

    from samtune.train import run_trial

    @two_cpu_ray.remote(num_cpus=1)
    class Squatter:
        def ping(self):
            return True

    squatter = Squatter.remote()
    two_cpu_ray.get(squatter.ping.remote())
    config = {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 64, "workers": 2,
              "optimizer": "sgd", "sharpness_measures": "", "placement_timeout_s": 3}
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": 1}), param_space=config,
        run_config=tune.RunConfig(name="unplaceable", storage_path=str(tmp_path), verbose=0))
    grid = tuner.fit()
    (error,) = grid.errors
    text = str(error)
    assert "2 training workers of 0.5 CPU each could not be placed within placement_timeout_s=3 s" in text, text
    assert "0 CPU free" in text or "free" in text

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
    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
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


# ------------------------------------------------------------------------------ several nodes
PER_WORKER_SAM = (
    "from samtune.space import Sweep\n"
    "def space(trial):\n"
    "    trial.suggest_categorical('optimizer', ['sam'])\n"
    "    return {{'lr': 0.1, 'rho': 0.05}}\n"
    "SWEEP = Sweep(name='t', dataset='digits', model='mlp', epochs={epochs}, batch_size=64, trials=1,\n"
    "              workers=2, label_noise_rates=(0.2,), seed=3,\n"
    "              fixed={{'sharpness_measures': '', 'placement_timeout_s': {timeout}}})\n")


def space_file(tmp_path, epochs=2, timeout=300):
    path = tmp_path / "space.py"
    path.write_text(PER_WORKER_SAM.format(epochs=epochs, timeout=timeout))
    return path


def sweep_at(tmp_path, space, *extra, folder="runs"):
    return [sys.executable, "-m", "samtune.cli", "sweep", str(space), "--storage-path", str(tmp_path / folder),
            "--tracking-uri", f"sqlite:///{tmp_path}/{folder}.db", *extra]


def trial_runs(tmp_path, folder="runs"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/{folder}.db")
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return client, [r for r in runs if r.data.tags.get("samtune.role") == "trial"]


@pytest.fixture
def two_nodes():
    """A Ray cluster of two 1-CPU nodes on this machine (Ray's own multi-node test harness),
    stopped through its API. The file through which `ray.init("auto")` finds a cluster is put
    back as it was, so no later test joins a cluster that is gone."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_bytes() if current.exists() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_bytes(before)


@pytest.mark.slow
def test_two_workers_on_two_nodes_train_as_on_one_node(tmp_path, two_nodes):
    space = space_file(tmp_path)
    proc = subprocess.run(sweep_at(tmp_path, space, "--address", two_nodes.address),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client, (trial,) = trial_runs(tmp_path)
    assert trial.data.tags["samtune.status"] == "finished"
    # One worker per node, read from the trial's recorded placement (node ids in rank order).
    placement = trial.data.tags["samtune.placement"].split(",")
    assert sorted(placement) == sorted(n.node_id for n in two_nodes.list_all_nodes())
    assert trial.data.metrics["nodes"] == 2
    # Per-worker m-sharpness across nodes: each worker perturbs on its own 32 examples, and a step
    # still needs a single gradient all-reduce (the second pass's).
    assert trial.data.metrics["m_workers"] == 1 and trial.data.metrics["m_per_worker_batch"] == 32
    assert [m.value for m in client.get_metric_history(trial.info.run_id, "allreduce_per_step")] == [1, 1]

    # The same sweep on this machine alone (a private one-node Ray instance): the same numbers.
    alone = subprocess.run(sweep_at(tmp_path, space, folder="alone"), cwd=tmp_path, env=env(),
                           capture_output=True, text=True, timeout=900)
    assert alone.returncode == 0, (alone.stdout + alone.stderr)[-4000:]
    one_client, (one,) = trial_runs(tmp_path, "alone")
    assert one.data.metrics["nodes"] == 1
    for name in ("train_loss", "val_loss", "test_loss", "test_error", "train_acc_noisy"):
        two = [m.value for m in client.get_metric_history(trial.info.run_id, name)]
        single = [m.value for m in one_client.get_metric_history(one.info.run_id, name)]
        assert len(two) == len(single) == 2
        assert two == pytest.approx(single, rel=1e-5, abs=1e-6), name

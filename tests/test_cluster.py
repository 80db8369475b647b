"""Sweeps with Ray Train workers: several cells and workers in one sweep, and worker groups that
cannot be placed."""

import csv
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_sweep import env, epochs_logged, runs_of

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "search_spaces" / "noisy_digits.py"


@pytest.mark.slow
@pytest.mark.parametrize("machine", ["quiet", "busy"])
def test_the_embedded_study_with_two_workers_finishes_every_trial_of_every_cell(tmp_path, machine, request):
    """The main job's shape: all cells share one Tuner, each trial runs a 2-worker TorchTrainer.
    The trial after the first used to fail ("Could not re-use actor") or wait forever; on a busy
    machine (every core spinning) the second trial used to wait out its placement timeout."""
    if machine == "busy":
        request.getfixturevalue("busy_machine")
    cmd = [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(EMBEDDED),
        "--set",
        "name=t",
        "--set",
        "confirm_seeds=0",
        "--set",
        "epochs=2",
        "--set",
        "trials=2",
        "--set",
        "workers=2",
        "--set",
        "label_noise_rates=0.0,0.4",
        "--set",
        "fixed.sharpness_measures=m_sharpness,hessian_trace",
        # A budget the m-sharpness measure (2 gradient passes) fits in and the Hessian trace does
        # not, however loaded the machine: with 2,000 probes the trace expects 8,001 passes. (At
        # 24 probes, 97 passes, no fixed budget split them: a pass on the 512 examples measured took
        # 0.025 s quiet and 0.5 s beside three other jobs, and m-sharpness was skipped there.)
        "--set",
        "fixed.sharpness_settings={'hessian_trace': {'probes': 2000}}",
        "--set",
        "fixed.sharpness_budget_s=3",
        "--storage-path",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    # Minutes on a quiet machine; a loaded one (every core spinning, other jobs) may take several times that.
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=2400)
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
            # The budget skipped the costly measure, said so in MLflow, and kept the cheap one.
            assert "sharpness/hessian_trace" not in t.data.metrics
            assert t.data.metrics["sharpness/hessian_trace/skipped"] == 1
            assert "hessian_trace" in t.data.tags["samtune.sharpness_skipped"]


def test_a_sweeps_ray_runs_its_workers_at_the_drivers_priority(tmp_path):
    """Ray's default puts workers at nice 15: beside any busy process they starve, and a trial
    waits out its placement timeout while the last one's workers are still being torn down."""
    import os

    import ray

    from samtune.sweep.cluster import start_ray

    # The sweep's Ray settings and Ray's SIGTERM handler must not leak into later tests.
    saved, on_term = dict(os.environ), signal.getsignal(signal.SIGTERM)
    if ray.is_initialized():
        ray.shutdown()
    start_ray(None)
    try:

        @ray.remote(num_cpus=1)
        def niceness():
            return os.nice(0)

        assert ray.get(niceness.remote()) == os.nice(0)
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        signal.signal(signal.SIGTERM, on_term)


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

    from samtune.trial.ray_trial import run_trial

    @two_cpu_ray.remote(num_cpus=1)
    class Squatter:
        def ping(self):
            return True

    squatter = Squatter.remote()
    two_cpu_ray.get(squatter.ping.remote())
    config = {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 1,
        "batch_size": 64,
        "workers": 2,
        "optimizer": "sgd",
        "sharpness_measures": "",
        "placement_timeout_s": 3,
    }
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": 1}),
        param_space=config,
        run_config=tune.RunConfig(name="unplaceable", storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    (error,) = grid.errors
    text = str(error)
    assert "2 training workers of 0.5 CPU each could not be placed within placement_timeout_s=3 s" in text, text
    assert "0 CPU free" in text or "free" in text


# ------------------------------------------------------------------------------ several nodes
PER_WORKER_SAM = (
    "from samtune.sweep import Sweep\n"
    "def space(trial):\n"
    "    trial.suggest_categorical('optimizer', ['sam'])\n"
    "    return {{'lr': 0.1, 'rho': 0.05}}\n"
    "SWEEP = Sweep(name='t', dataset='digits', model='{model}', epochs={epochs}, batch_size=64, trials=1,\n"
    "              workers=2, label_noise_rates=(0.2,), seed=3,\n"
    "              fixed={{'sharpness_measures': '', 'placement_timeout_s': {timeout},\n"
    "                     'max_failures': {max_failures}}})\n"
)


def space_file(tmp_path, epochs=2, timeout=300, model="mlp", max_failures=2):
    path = tmp_path / "space.py"
    path.write_text(PER_WORKER_SAM.format(epochs=epochs, timeout=timeout, model=model, max_failures=max_failures))
    return path


def sweep_at(tmp_path, space, *extra, folder="runs"):
    return [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(space),
        "--storage-path",
        str(tmp_path / folder),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/{folder}.db",
        *extra,
    ]


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
    proc = subprocess.run(
        sweep_at(tmp_path, space, "--address", two_nodes.address),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
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
    alone = subprocess.run(
        sweep_at(tmp_path, space, folder="alone"), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900
    )
    assert alone.returncode == 0, (alone.stdout + alone.stderr)[-4000:]
    one_client, (one,) = trial_runs(tmp_path, "alone")
    assert one.data.metrics["nodes"] == 1
    for name in ("train_loss", "val_loss", "test_loss", "test_error", "train_acc_noisy"):
        two = [m.value for m in client.get_metric_history(trial.info.run_id, name)]
        single = [m.value for m in one_client.get_metric_history(one.info.run_id, name)]
        assert len(two) == len(single) == 2
        assert two == pytest.approx(single, rel=1e-5, abs=1e-6), name


def wait_for_epoch(tmp_path, proc, epoch, timeout=300):
    """Wait until the sweep's one trial has logged `epoch` to MLflow."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if (tmp_path / "runs" / "t" / "sweep.json").exists():  # the store exists whole
            try:
                client, trials = trial_runs(tmp_path)
            except Exception:  # noqa: BLE001  the store is still being created
                trials = []
            if trials and epoch in epochs_logged(client, trials[0]):
                return
        time.sleep(0.5)
    raise AssertionError(f"epoch {epoch} never reached MLflow")


@pytest.mark.slow
def test_a_trial_that_loses_a_node_resumes_from_its_checkpoint_when_a_node_comes_back(tmp_path, two_nodes):
    space = space_file(tmp_path, epochs=10, model="cnn", timeout=120)
    proc = subprocess.Popen(
        sweep_at(tmp_path, space, "--address", two_nodes.address),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_epoch(tmp_path, proc, 2)
        (lost,) = two_nodes.worker_nodes
        two_nodes.remove_node(lost, allow_graceful=False)  # the node dies: its raylet and workers
        time.sleep(5)
        back = two_nodes.add_node(num_cpus=1)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    client, trials = trial_runs(tmp_path)
    (trial,) = trials  # the sweep's budget, once: the restarted trial kept its run
    assert trial.data.tags["samtune.status"] == "finished"
    assert epochs_logged(client, trial) == list(range(1, 11))
    # The latest placement is the one after the loss: one worker on the node that came back.
    assert back.node_id in trial.data.tags["samtune.placement"].split(",")
    assert lost.node_id not in trial.data.tags["samtune.placement"]
    # It went on from its checkpoint: Tune saw each epoch once (a restart from scratch would have
    # reported the first epochs again; MLflow alone would not show it, as it skips logged steps).
    (progress,) = (tmp_path / "runs" / "t" / "trials").glob("*/progress.csv")
    with progress.open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, 11))


@pytest.mark.slow
def test_a_trial_whose_lost_node_does_not_come_back_fails_naming_the_missing_resources(tmp_path, two_nodes):
    space = space_file(tmp_path, epochs=10, model="cnn", timeout=10, max_failures=1)
    proc = subprocess.Popen(
        sweep_at(tmp_path, space, "--address", two_nodes.address),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_epoch(tmp_path, proc, 2)
        (lost,) = two_nodes.worker_nodes
        two_nodes.remove_node(lost, allow_graceful=False)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Its worker group waited placement_timeout_s, then the trial failed; restarted once
    # (max_failures=1), it asked for what it first ran with (not half a CPU per worker on the one
    # node left) and failed again; the sweep then ended, saying why.
    client, (trial,) = trial_runs(tmp_path)
    assert trial.data.tags["samtune.status"] == "failed"
    reason = (
        "WorkerPlacementError: 2 training workers of 1 CPU each could not be placed within "
        "placement_timeout_s=10 s: the Ray cluster has 1 alive node(s)"
    )
    assert reason in trial.data.tags["samtune.error"]
    assert reason in out
    assert (
        f"trial {trial.data.tags['samtune.trial_key'].rsplit('/', 1)[1]} failed and restarts from its last "
        f"checkpoint: samtune.trial.placement.{reason}" in out
    )
    epochs = epochs_logged(client, trial)
    assert epochs == list(range(1, len(epochs) + 1)) and 2 <= len(epochs) < 10
    assert "Traceback" not in out, out


# ------------------------------------------------------------------------------ a cluster already here
PROBE = (
    "import json, sys, ray\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
    "print(json.dumps({'total': ray.cluster_resources(), 'free': ray.available_resources(),\n"
    "                  'nodes': [n['NodeID'] for n in ray.nodes() if n['Alive']]}))\n"
)


def probe():
    """The resources of the cluster `ray start` runs here, read by a driver of its own (found as
    `--address auto` finds it: Ray's token authentication admits a driver that way)."""
    out = subprocess.run([sys.executable, "-c", PROBE, "auto"], capture_output=True, text=True, timeout=120, env=env())
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_and_outside(resources):
    return {k: resources.get(k) for k in ("CPU", "outside")}


@pytest.fixture
def ray_start_cluster(tmp_path):
    """`ray start --head`, as a user's own workstation cluster; `--block` keeps its process in
    front, so stopping that process (by PID) stops the cluster."""
    import socket

    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_bytes() if current.exists() else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    log = open(tmp_path / "ray-start.log", "w")
    proc = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=1",
            '--resources={"outside": 1}',
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env(),
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp_path / "ray-start.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "ray-start.log").read_text()
            time.sleep(0.5)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_bytes(before)


def digits_sweep(tmp_path, *extra):
    return [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(EMBEDDED),
        "--set",
        "name=t",
        "--set",
        "confirm_seeds=0",
        "--set",
        "model=mlp",
        "--set",
        "epochs=3",
        "--set",
        "trials=1",
        "--set",
        "label_noise_rates=0.0",
        "--set",
        "fixed.sharpness_measures=",
        "--storage-path",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/runs.db",
        *extra,
    ]


@pytest.mark.slow
def test_without_address_a_sweep_runs_on_its_own_ray_beside_a_running_cluster(tmp_path, ray_start_cluster):
    outside = probe()
    assert cpu_and_outside(outside["total"]) == {"CPU": 1.0, "outside": 1.0}
    proc = subprocess.Popen(
        digits_sweep(tmp_path), cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # While its trial trains, the other cluster has all its resources free.
        deadline = time.time() + 300
        while not list((tmp_path / "runs").glob("t/trials/*/progress.csv")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        during = probe()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out
    assert cpu_and_outside(during["free"]) == cpu_and_outside(during["total"]) == cpu_and_outside(outside["total"])
    after = probe()
    assert cpu_and_outside(after["free"]) == cpu_and_outside(outside["total"])
    assert after["nodes"] == outside["nodes"]
    _, (trial,) = trial_runs(tmp_path)
    assert trial.data.tags["samtune.status"] == "finished"
    assert trial.data.tags["samtune.placement"] not in outside["nodes"]


@pytest.mark.slow
def test_with_address_auto_a_sweep_runs_its_trials_on_the_running_cluster(tmp_path, ray_start_cluster):
    (node,) = probe()["nodes"]
    proc = subprocess.run(
        digits_sweep(tmp_path, "--address", "auto"),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _, (trial,) = trial_runs(tmp_path)
    assert trial.data.tags["samtune.status"] == "finished"
    assert trial.data.tags["samtune.placement"] == node


def test_a_storage_folder_a_node_cannot_read_is_refused_naming_that_node(tmp_path, monkeypatch):
    """Decided from each node's answer (a pinned task reading a file written here); the real
    answers, all yes, come from the two-node sweep above."""
    import ray

    from samtune.sweep import cluster as sweep_module

    nodes = [
        {"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1"},
        {"NodeID": "b" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.2"},
        {"NodeID": "c" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.3"},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    asked = []

    def answers(alive, path, token):
        asked.append((len(alive), Path(path).read_text() == token))
        return [True, False]

    monkeypatch.setattr(sweep_module, "read_on_every_node", answers)
    with pytest.raises(
        sweep_module.SweepError,
        match=r"--storage-path .*: 1 of the Ray cluster's 2 nodes cannot "
        r"reach it \(10\.0\.0\.2 \(bbbbbbbb\)\); every node must",
    ):
        sweep_module.check_shared_storage(tmp_path)
    assert asked == [(2, True)]  # only alive nodes are asked, and the file was there to read
    assert not list(tmp_path.iterdir())  # the probe file is gone
    monkeypatch.setattr(sweep_module, "read_on_every_node", lambda alive, path, token: [True] * len(alive))
    sweep_module.check_shared_storage(tmp_path)
    # One node: nothing to ask.
    monkeypatch.setattr(ray, "nodes", lambda: nodes[:1])
    monkeypatch.setattr(sweep_module, "read_on_every_node", None)
    sweep_module.check_shared_storage(tmp_path)

"""Sweeps with Ray Train workers: several cells and workers in one sweep, and worker groups that
cannot be placed."""

import contextlib
import csv
import json
import math
import re
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


@contextlib.contextmanager
def ray_start_head(folder, cpus, resources=None):
    """`ray start --head`, as a user's own workstation cluster, with token authentication on (as
    Ray starts one wherever this user holds a token); `--block` keeps its process in front, so
    stopping that process (by PID) stops the cluster. Yields its host:port."""
    import socket

    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_bytes() if current.exists() else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    # What a first Ray instance on this machine does: keep a token in ~/.ray/auth_token.
    subprocess.run([str(ray_cli), "get-auth-token", "--generate"], capture_output=True, timeout=60, check=True)
    log_path = folder / "ray-start.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--num-cpus={cpus}",
            *([f"--resources={json.dumps(resources)}"] if resources else []),
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env(RAY_AUTH_MODE="token"),
    )
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_bytes(before)


@pytest.fixture
def ray_start_cluster(tmp_path):
    """A `ray start --head` cluster of 1 CPU and a resource of its own, ``outside``."""
    with ray_start_head(tmp_path, cpus=1, resources={"outside": 1}) as address:
        yield address


def driver_env(**extra):
    """A driver's environment as a user's shell has it: no Ray auth settings of its own."""
    e = env()
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        e.pop(key, None)
    return {**e, **extra}  # after env(), which drops RAY_ADDRESS


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
@pytest.mark.parametrize("route", ["--address auto", "--address host:port", "RAY_ADDRESS=host:port"])
def test_each_documented_route_runs_the_sweeps_trials_on_the_running_cluster(tmp_path, ray_start_cluster, route):
    """The cluster requires Ray's auth token; the driver has no Ray auth setting, and sends the
    token this machine holds by each route."""
    (node,) = probe()["nodes"]
    extra = {"--address auto": ["--address", "auto"], "--address host:port": ["--address", ray_start_cluster]}
    started = time.time()
    proc = subprocess.run(
        digits_sweep(tmp_path, "--set", "epochs=1", *extra.get(route, [])),
        cwd=tmp_path,
        env=driver_env(**({"RAY_ADDRESS": ray_start_cluster} if route.startswith("RAY_ADDRESS") else {})),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "InvalidAuthToken" not in out, out[-4000:]
    _, (trial,) = trial_runs(tmp_path)
    assert trial.data.tags["samtune.status"] == "finished"
    assert trial.data.tags["samtune.placement"] == node
    print(f"{route}: {time.time() - started:.1f} s")


@pytest.mark.slow
def test_a_refused_auth_token_stops_the_sweep_in_one_line_naming_the_fix(tmp_path, ray_start_cluster, monkeypatch):
    from samtune.sweep import cluster as sweep_module

    started = time.time()
    proc = subprocess.run(
        digits_sweep(tmp_path, "--address", ray_start_cluster),
        cwd=tmp_path,
        env=driver_env(RAY_AUTH_TOKEN="not-the-token"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.time() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # Ray alone retried the refusal for 30 s, printing a line a second, then named no cause.
    assert proc.stdout.strip() == "" and "InvalidAuthToken" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (
        f"samtune: error: --address {ray_start_cluster}: that Ray cluster refuses the auth token in RAY_AUTH_TOKEN; "
        f"it accepts the one in {Path.home() / '.ray' / 'auth_token'}: unset RAY_AUTH_TOKEN"
    )
    assert not list((tmp_path / "runs").glob("t/trials/*"))
    print(f"refused after {took:.1f} s (imports and the dataset included)")
    # No token here at all: what to set, and where the cluster's token comes from.
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(sweep_module.SweepError) as refused:
        sweep_module.check_address(ray_start_cluster)
    assert str(refused.value) == (
        f"--address {ray_start_cluster}: that Ray cluster requires an auth token and none was found here "
        "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); pass the cluster's token as "
        "RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> (`ray get-auth-token` on its head node prints it)"
    )


def test_address_auto_refuses_to_guess_among_several_clusters(monkeypatch):
    from samtune.sweep import cluster as sweep_module

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(sweep_module, "local_clusters", lambda: ["10.0.0.1:6379", "10.0.0.1:6380"])
    with pytest.raises(
        sweep_module.SweepError,
        match=r"^--address auto: 2 Ray clusters run on this machine \(10\.0\.0\.1:6379, 10\.0\.0\.1:6380\); "
        r"say which to join with --address host:port$",
    ):
        sweep_module.check_address("auto")
    monkeypatch.setattr(sweep_module, "local_clusters", lambda: [])
    with pytest.raises(sweep_module.SweepError, match=r"^--address auto: no Ray cluster runs on this machine; start"):
        sweep_module.check_address("auto")
    # Without --address or RAY_ADDRESS, nothing is joined: the sweep starts its own Ray.
    assert sweep_module.check_address(None) is None


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


# ------------------------------------------------------------------------------ reuse in your own cluster
README = ROOT / "README.md"
EXAMPLE_MARK = "# (tests/test_cluster.py runs this block as written"


def readme_example():
    """The README's reuse example: the python block that carries the mark."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith(EXAMPLE_MARK)]
    return block


@pytest.mark.slow
def test_the_readme_reuse_example_trains_on_a_ray_start_cluster(tmp_path):
    example = readme_example()
    dump = "\nimport json\njson.dump(dict(result.metrics), open('metrics.json', 'w'), default=str)\n"
    (tmp_path / "example.py").write_text(example + dump)
    config = re.search(r"config = \{.*?\n\}", example, flags=re.S).group(0)
    asked = eval(config.partition("=")[2], {"workers": 2})  # noqa: S307  the README's own literal
    # "auto" finds the cluster as a user's shell would: the last one `ray start` made here.
    with ray_start_head(tmp_path, cpus=2):
        proc = subprocess.run(
            [sys.executable, "example.py"],
            cwd=tmp_path,
            env=driver_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epoch"] == asked["epochs"] == 2
    # Digits has 10 classes: chance is an error of 0.9; two epochs of an MLP get far below it.
    assert 0.0 <= metrics["test_error"] < 0.3, metrics
    assert metrics["diverged"] == 0
    # Both workers trained, each perturbing its own half of the global batch.
    assert metrics["m_per_worker_batch"] == asked["batch_size"] // 2 and metrics["m_workers"] == 1
    assert math.isfinite(metrics["sharpness/m_sharpness"])
    assert "sharpness/hessian_trace" not in metrics
    assert f"epoch 2: test_error={metrics['test_error']:.3f}" in proc.stdout


@pytest.mark.slow
def test_a_workers_setting_other_than_the_worker_groups_size_is_refused_before_training(two_cpu_ray, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from samtune.trial.entry import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"dataset": "digits", "model": "mlp", "epochs": 1, "workers": 3, "sharpness_measures": ""},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="mismatch", storage_path=str(tmp_path)),
    )
    with pytest.raises(Exception) as failed:
        trainer.fit()
    assert (
        "workers=3 in the trial config, but the worker group has 2 workers (num_workers); "
        "set workers to 2 or leave it out" in str(failed.value)
    ), failed.value
    # Refused before any compute: no epoch was reported, so no checkpoint was written.
    assert not list(tmp_path.rglob("trial.pt"))
    # Left out, it is the worker group's size: the global batch of 64 splits 32 + 32.
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"dataset": "digits", "model": "mlp", "epochs": 1, "data_subset": 256, "optimizer": "sam"}
        | {"sharpness_measures": ""},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="left-out", storage_path=str(tmp_path)),
    )
    metrics = trainer.fit().metrics
    assert metrics["m_per_worker_batch"] == 32 and metrics["m_workers"] == 1 and metrics["epoch"] == 1

"""Sweeps kept in object storage (``--storage-path s3://...``), against a real S3 API server on
127.0.0.1 (moto's server mode, `object_store.s3_server`): the bucket probe, the driver's lease,
the mirror of the sweep's own files, and whole sweeps that are killed and resumed elsewhere."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from object_store import SECRET_KEY
from test_cluster import space_file, two_nodes  # noqa: F401  (the two-node Ray harness, a fixture)
from test_sweep import SPACE, env, epochs_logged, kill_session

from samtune.sweep.errors import SweepError
from samtune.sweep.lease import DriverLease
from samtune.sweep.object_store import Bucket, Mirror, is_remote, open_bucket, shown
from samtune.sweep.storage import UNSENT, check_storage_uri, hold, send_last

# ----------------------------------------------------------------------------- storage and bucket


def test_only_uris_with_a_scheme_other_than_file_are_object_storage():
    assert is_remote("s3://b/p") and is_remote("gs://b") and is_remote("abfs://c@acct/p")
    assert not is_remote("runs") and not is_remote("/abs/runs") and not is_remote("file:///tmp/x")
    assert not is_remote("weird/dir://name")  # a relative folder whose name holds '://'


@pytest.mark.parametrize(
    "uri, what",
    [
        ("s3://sweeps/x?endpoint_override=h:1&secret_key=abc&access_key=AK", "access_key, secret_key"),
        ("s3://user:pw@sweeps/x", "a password"),
    ],
)
def test_a_storage_uri_that_carries_credentials_is_refused_without_showing_them(uri, what):
    with pytest.raises(SweepError) as err:
        check_storage_uri(uri)
    message = str(err.value)
    assert f"the URI carries credentials ({what})" in message
    assert "abc" not in message and ":pw@" not in message and "AWS_ACCESS_KEY_ID" in message


def test_a_bucket_that_does_not_exist_is_refused_before_anything_is_written(s3_server, tmp_path):
    with pytest.raises(SweepError) as err:
        open_bucket("s3://no-such-bucket/sweeps")
    assert (
        str(err.value)
        == "--storage-path s3://no-such-bucket/sweeps: cannot write there: there is no bucket 'no-such-bucket'"
    )
    assert s3_server.keys() == []


def test_a_sweep_on_a_missing_bucket_is_refused_by_the_cli_in_one_line(s3_server, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "samtune.cli", "sweep", str(SPACE), "--storage-path", "s3://nope/sweeps"],
        cwd=tmp_path,
        env=env(SAMTUNE_STAGING=str(tmp_path / "staging")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line == "samtune: error: --storage-path s3://nope/sweeps: cannot write there: there is no bucket 'nope'"
    assert SECRET_KEY not in proc.stdout + proc.stderr
    assert not (tmp_path / "staging").exists() and not list(tmp_path.glob("*.db"))


# ----------------------------------------------------------------------------- the driver's lease

HOLD = """
import sys, time
from samtune.sweep.lease import DriverLease
from samtune.sweep.object_store import open_bucket
lease = DriverLease.acquire(open_bucket(sys.argv[1]), "s")
print("held", flush=True)
time.sleep(600)
"""


def _holder(uri: str, tmp_path: Path, **extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, uri], stdout=subprocess.PIPE, text=True, env=env(**extra), cwd=tmp_path
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_is_refused_while_the_first_renews_its_lease(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMTUNE_LEASE_S", "4")
    uri = f"s3://{s3_server.bucket}/sweeps"
    holder = _holder(uri, tmp_path, SAMTUNE_LEASE_S="4")
    try:
        time.sleep(6)  # past one lease length: only its renewals keep it
        with pytest.raises(SweepError) as err:
            DriverLease.acquire(open_bucket(uri), "s")
        message = str(err.value)
        assert message.startswith(f"sweep 's' is already running (driver pid {holder.pid} on ")
        assert "taken over 4 s after it was last heard from" in message
    finally:
        holder.kill()
        holder.wait()


def test_the_lease_of_a_killed_driver_is_taken_over_once_it_lapses_and_released_at_the_end(
    s3_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("SAMTUNE_LEASE_S", "3")
    uri = f"s3://{s3_server.bucket}/sweeps"
    holder = _holder(uri, tmp_path, SAMTUNE_LEASE_S="3")
    holder.send_signal(signal.SIGKILL)  # no release: the lease stays, unrenewed
    holder.wait()
    assert s3_server.keys("sweeps/.s.driver.lease") == ["sweeps/.s.driver.lease"]
    time.sleep(4)
    lease = DriverLease.acquire(open_bucket(uri), "s")
    record = json.loads(s3_server.client().get_object(Bucket="sweeps", Key="sweeps/.s.driver.lease")["Body"].read())
    assert record["pid"] == os.getpid()
    lease.release()
    assert s3_server.keys("sweeps/.s.driver.lease") == []


def test_a_driver_whose_lease_was_taken_stops_its_sweep(s3_server, monkeypatch):
    monkeypatch.setenv("SAMTUNE_LEASE_S", "2")
    stopped = []
    monkeypatch.setattr("samtune.sweep.lease.stop_this_sweep", lambda: stopped.append("stopped"))
    lease = DriverLease.acquire(open_bucket(f"s3://{s3_server.bucket}/sweeps"), "s")
    # Another driver writes the lease (as after a takeover): this one's next renewal must fail.
    s3_server.client().put_object(Bucket="sweeps", Key="sweeps/.s.driver.lease", Body=b'{"pid": 1}')
    deadline = time.time() + 10
    while not lease.lost and time.time() < deadline:
        time.sleep(0.1)
    assert lease.lost and stopped == ["stopped"]
    lease.release()  # not its lease any more: left in place
    assert s3_server.keys("sweeps/.s.driver.lease") == ["sweeps/.s.driver.lease"]


# ----------------------------------------------------------------------------- the mirror


def test_the_mirror_sends_what_changed_deletes_what_went_and_leaves_tunes_folders_to_tune(s3_server, tmp_path):
    top = open_bucket(f"s3://{s3_server.bucket}/sweeps")
    bucket = Bucket(top.uri_of("s"), top.fs, top.path("s"))
    local = tmp_path / "stage" / "s"
    (local / "verdicts").mkdir(parents=True)
    (local / "trials").mkdir()
    (local / "sweep.json").write_text('{"a": 1}')
    (local / "verdicts" / "verdicts.md").write_text("| x |")
    (local / "trials" / "experiment_state-1.json").write_text("{}")  # Tune's: it uploads it itself
    mirror = Mirror(local, bucket, skip=("trials", "confirm"))
    assert mirror.push() == 2
    assert sorted(s3_server.keys("sweeps/s/")) == ["sweeps/s/sweep.json", "sweeps/s/verdicts/verdicts.md"]
    assert mirror.push() == 0  # nothing changed: nothing sent
    (local / "sweep.json").write_text('{"a": 2}')
    (local / "verdicts" / "verdicts.md").unlink()
    assert mirror.push() == 1
    assert s3_server.keys("sweeps/s/") == ["sweeps/s/sweep.json"]
    # Another machine: an empty staging folder gets the bucket's copy.
    elsewhere = Mirror(tmp_path / "other" / "s", bucket, skip=("trials", "confirm"))
    assert elsewhere.pull() == 1
    assert (tmp_path / "other" / "s" / "sweep.json").read_text() == '{"a": 2}'


def test_files_the_last_push_could_not_send_are_sent_by_the_next_driver_on_this_machine(
    s3_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("SAMTUNE_STAGING", str(tmp_path / "staging"))
    uri = f"s3://{s3_server.bucket}/sweeps"
    held = hold(uri, "s")
    (held.sweep_dir / "mlflow-unlogged.jsonl").write_text('{"record": 1}\n')
    assert held.mirror is not None
    monkeypatch.setattr(held.mirror.bucket, "write", _fail)
    message = send_last(held.mirror, held.sweep_dir)
    assert message is not None and "the next samtune sweep --resume on this machine sends them" in message
    assert (held.sweep_dir / UNSENT).exists() and s3_server.keys("sweeps/s/") == []
    held.lock.release()
    again = hold(uri, "s")  # the next driver here: sends first, then reads the bucket's copy
    assert s3_server.keys("sweeps/s/") == ["sweeps/s/mlflow-unlogged.jsonl"]
    assert (again.sweep_dir / "mlflow-unlogged.jsonl").read_text() == '{"record": 1}\n'
    assert not (again.sweep_dir / UNSENT).exists()
    again.lock.release()


def _fail(*args: object) -> None:
    raise OSError("the bucket is away")


def test_messages_show_storage_uris_without_their_query():
    assert shown("s3://b/p?endpoint_override=h:9000") == "s3://b/p?..."
    assert shown("s3://b/p") == "s3://b/p"


# ----------------------------------------------------------------------------- whole sweeps


def s3_sweep(tmp_path: Path, uri: str, *extra: str, name: str = "t") -> list[str]:
    return [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(SPACE),
        *("--set", f"name={name}", "--set", "model=mlp", "--set", "batch_size=128"),
        *("--set", "fixed.sharpness_measures=m_sharpness", "--set", "ablations="),
        "--storage-path",
        uri,
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        *extra,
    ]


def trial_runs(tmp_path: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("t")
    if exp is None:
        return client, []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("samtune.role") == "trial"]


@pytest.mark.slow
def test_a_killed_sweep_in_a_bucket_is_finished_by_a_driver_elsewhere(s3_server, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for machine in (first, second):
        (machine / "home").mkdir(parents=True)
    uri = f"s3://{s3_server.bucket}/sweeps"
    sets = ("--set", "epochs=3", "--set", "trials=3", "--set", "label_noise_rates=0.0,0.4")
    sets += ("--set", "confirm_seeds=2", "--set", "max_confirm_seeds=2")  # one confirmation round
    proc = subprocess.Popen(
        s3_sweep(tmp_path, uri, *sets, "--no-report"),
        cwd=first,
        env=env(HOME=str(first / "home"), SAMTUNE_LEASE_S="4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
            try:
                _, trials = trial_runs(tmp_path)
            except Exception:  # noqa: BLE001  the store is still being created
                trials = []
            if sum(t.data.tags.get("samtune.status") != "running" for t in trials) >= 2:
                break
            time.sleep(1)
        kill_session(proc.pid)  # the driver and its Ray, at once: no lease released, no last push
        proc.wait(timeout=60)
    finally:
        kill_session(proc.pid)
    assert "sweeps/t/sweep.json" in s3_server.keys("sweeps/t/")
    time.sleep(5)  # the killed driver's lease lapses
    # Another machine: its own working directory, HOME and staging folder; the bucket alone.
    resumed = subprocess.run(
        s3_sweep(tmp_path, uri, *sets, "--resume", "--no-report"),
        cwd=second,
        env=env(HOME=str(second / "home"), SAMTUNE_LEASE_S="4"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert SECRET_KEY not in out
    client, trials = trial_runs(tmp_path)
    keys = [t.data.tags["samtune.trial_key"] for t in trials]
    assert len(keys) == len(set(keys)) == 6  # 3 trials in each of 2 cells, each once
    for t in trials:
        assert t.data.tags["samtune.status"] in ("finished", "stopped", "diverged")
        steps = epochs_logged(client, t)
        assert steps == list(range(1, len(steps) + 1))
    stored = s3_server.keys("sweeps/")
    assert "sweeps/t/verdicts/verdicts.md" in stored and "sweeps/.t.driver.lease" not in stored
    assert any(k.startswith("sweeps/t/confirm/") for k in stored)
    assert any(k.startswith("sweeps/t/optuna-journal/") for k in stored)  # the cells' studies, in the bucket
    # Each trial keeps at most its two newest checkpoints in the bucket.
    per_trial: dict[str, set[str]] = {}
    for key in stored:
        parts = key.split("/")
        if len(parts) > 4 and parts[2] == "trials" and parts[4].startswith("checkpoint_"):
            per_trial.setdefault(parts[3], set()).add(parts[4])
    assert per_trial and max(len(c) for c in per_trial.values()) <= 2
    # The second machine worked from its own staging folder, filled from the bucket.
    assert list((second / "home" / ".cache" / "samtune" / "staging").glob("*/t/sweep.json"))


@pytest.mark.slow
def test_a_trial_that_loses_a_node_resumes_from_its_checkpoint_in_the_bucket(s3_server, tmp_path, two_nodes):  # noqa: F811
    space = space_file(tmp_path, epochs=10, model="cnn", timeout=120)
    uri = f"s3://{s3_server.bucket}/sweeps"
    proc = subprocess.Popen(
        [sys.executable, "-m", "samtune.cli", "sweep", str(space), "--address", two_nodes.address, "--storage-path",
         uri, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
        cwd=tmp_path,
        env=env(SAMTUNE_STAGING=str(tmp_path / "staging")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
            try:
                client, trials = trial_runs(tmp_path)
            except Exception:  # noqa: BLE001
                trials = []
            if trials and 2 in epochs_logged(client, trials[0]):
                break
            time.sleep(0.5)
        (lost,) = two_nodes.worker_nodes
        two_nodes.remove_node(lost, allow_graceful=False)
        time.sleep(5)
        two_nodes.add_node(num_cpus=1)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    client, (trial,) = trial_runs(tmp_path)
    assert trial.data.tags["samtune.status"] == "finished"
    assert epochs_logged(client, trial) == list(range(1, 11))
    # It went on from its checkpoint in the bucket: Tune saw each epoch once.
    (progress,) = [k for k in s3_server.keys("sweeps/t/trials/") if k.endswith("/progress.csv")]
    body = s3_server.client().get_object(Bucket="sweeps", Key=progress)["Body"].read().decode()
    header, *rows = body.strip().splitlines()
    column = header.split(",").index("epoch")
    assert [int(r.split(",")[column]) for r in rows] == list(range(1, 11))
    assert not list(tmp_path.glob("runs*"))  # nothing in a local storage folder


def test_each_nodes_probe_reads_the_bucket_with_its_own_credentials(s3_server, monkeypatch):
    from samtune.sweep.cluster import reads_token  # the task each node runs

    s3_server.client().put_object(Bucket="sweeps", Key="probe", Body=b"token-1")
    assert reads_token("s3://sweeps/probe", "token-1")
    assert not reads_token("s3://sweeps/probe", "token-2")
    assert not reads_token("s3://sweeps/missing", "token-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # a node that cannot reach the store
    assert not reads_token("s3://sweeps/probe", "token-1")


def test_a_study_in_a_bucket_journal_reads_back_whole_from_another_process_view(s3_server):
    import optuna
    from optuna.storages.journal import JournalStorage

    from samtune.sweep.bucket_journal import BucketJournal, journal_at

    uri = f"s3://{s3_server.bucket}/sweeps/t/optuna-journal"
    # Two cells' studies through two storages on one journal, as two cells' searchers open it.
    study = optuna.create_study(study_name="t/noise=0.4", storage=JournalStorage(journal_at(uri)))
    other = optuna.create_study(study_name="t/noise=0", storage=JournalStorage(journal_at(uri)))
    for x in (0.1, 0.2, 0.3):
        for s in (study, other):
            trial = s.ask()
            trial.suggest_float("lr", 0.01, 1.0)
            trial.report(x, 1)
            s.tell(trial, x)
    # Written as each entry came: what a driver on another machine reads, with nothing held over.
    again = optuna.load_study(study_name="t/noise=0.4", storage=JournalStorage(BucketJournal(uri)))
    assert [(t.params, t.value, t.intermediate_values) for t in again.trials] == [
        (t.params, t.value, t.intermediate_values) for t in study.trials
    ]
    assert len(optuna.load_study(study_name="t/noise=0", storage=JournalStorage(BucketJournal(uri))).trials) == 3
    assert pickle.loads(pickle.dumps(journal_at(uri))) is journal_at(uri)  # a restored searcher shares it
    keys = s3_server.keys("sweeps/t/optuna-journal/")
    assert keys and all(k.endswith(".jsonl") for k in keys)
    s3_server.client().delete_object(Bucket="sweeps", Key=keys[1])  # a lost write is named, not skipped
    with pytest.raises(ValueError, match="lacks entries before"):
        optuna.load_study(study_name="t/noise=0.4", storage=JournalStorage(BucketJournal(uri)))

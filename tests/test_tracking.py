"""MLflow records from the driver: found again instead of duplicated, and kept (then written) when
the tracking server goes away; a real `mlflow server` is stopped mid-sweep."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from samtune.sweep.tracking import Tracker


class FlakyClient:
    """An MlflowClient whose every call fails while `down` is set, like a server that went away."""

    def __init__(self, client):
        self.client, self.down = client, False

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                raise ConnectionError("tracking server unreachable")
            return attr(*args, **kwargs)

        return call


def history(client, run_id, key="epoch"):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_records_are_kept_while_the_server_is_down_and_written_once_it_is_back(tmp_path, background):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spool = tmp_path / "unlogged.jsonl"
    tracker = Tracker(uri, "exp", spool, retry_after_s=0.0, background=background)
    flaky = FlakyClient(tracker.client)
    tracker.client = flaky
    tracker.declare("exp", "exp", "sweep")
    tracker.declare("exp/t1", "t1", "trial", parent="exp", **{"samtune.trial_key": "exp/t1"})
    tracker.log_params("exp/t1", {"lr": 0.1})
    tracker.log_metrics("exp/t1", {"epoch": 1, "val_error": 0.5}, step=1)
    tracker.flush()  # epoch 1 is in before the server goes away
    flaky.down = True
    for epoch in (2, 3):
        tracker.log_metrics("exp/t1", {"epoch": epoch, "val_error": 0.5 / epoch}, step=epoch)
    tracker.set_status("exp/t1", "finished")
    message = tracker.close()
    assert message is not None and str(spool) in message and "3 record(s)" in message
    saved = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in saved] == [("metrics", 2), ("metrics", 3), ("status", None)]
    assert saved[0]["tags"]["samtune.trial_key"] == "exp/t1"
    flaky.down = False
    assert tracker.close() is None  # everything written now
    assert not spool.exists()
    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("exp").experiment_id], filter_string="tags.`samtune.role` = 'trial'"
    )
    assert history(client, run.info.run_id) == [1, 2, 3]
    assert run.data.tags["samtune.status"] == "finished"


def test_a_resumed_tracker_continues_the_same_run_without_repeating_steps(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = Tracker(uri, "exp", tmp_path / "s1.jsonl")
    first.declare("exp/t1", "t1", "trial", **{"samtune.trial_key": "exp/t1"})
    for epoch in (1, 2):
        first.log_metrics("exp/t1", {"epoch": epoch, "val_error": 0.1 * epoch}, step=epoch)
    first.close()
    # A new driver process (a resumed sweep) declares the same trial and replays epochs 2 and 3.
    second = Tracker(uri, "exp", tmp_path / "s2.jsonl")
    second.declare("exp/t1", "t1", "trial", **{"samtune.trial_key": "exp/t1"})
    for epoch in (2, 3):
        second.log_metrics("exp/t1", {"epoch": epoch, "val_error": 0.1 * epoch}, step=epoch)
    second.close()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1
    assert history(client, runs[0].info.run_id) == [1, 2, 3]


def test_non_finite_values_are_never_logged(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "exp", tmp_path / "s.jsonl")
    tracker.declare("k", "k", "trial")
    tracker.log_metrics(
        "k",
        {"epoch": 1, "train_loss": float("nan"), "val_error": float("inf"), "test_error": 0.2, "note": "text"},
        step=1,
    )
    tracker.close()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert set(run.data.metrics) == {"epoch", "test_error"}


class TimesOutAfterWriting(FlakyClient):
    """A client whose next `log_batch` reaches the server, then fails as a timed-out request does."""

    def __init__(self, client):
        super().__init__(client)
        self.writes_then_fails = 0

    def log_batch(self, *args, **kwargs):
        self.client.log_batch(*args, **kwargs)
        if self.writes_then_fails:
            self.writes_then_fails -= 1
            raise ConnectionError("read timed out")


def test_a_write_that_reached_the_server_before_timing_out_is_not_logged_twice(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "exp", tmp_path / "s.jsonl", retry_after_s=0.0)
    tracker.client = client = TimesOutAfterWriting(tracker.client)
    tracker.declare("exp/t1", "t1", "trial")
    tracker.log_metrics("exp/t1", {"epoch": 1, "val_error": 0.5}, step=1)
    client.writes_then_fails = 1
    tracker.log_metrics("exp/t1", {"epoch": 2, "val_error": 0.4}, step=2)  # written, then "timed out"
    assert tracker.pending == 1
    tracker.log_metrics("exp/t1", {"epoch": 3, "val_error": 0.3}, step=3)  # the retry goes first
    assert tracker.close() is None
    mlflow = MlflowClient(uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("exp").experiment_id])
    assert history(mlflow, run.info.run_id) == [1, 2, 3]
    assert history(mlflow, run.info.run_id, "val_error") == [1, 2, 3]


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_a_record_the_server_refuses_is_set_aside_and_the_rest_is_written(tmp_path, caplog, background):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spool = tmp_path / "unlogged.jsonl"
    tracker = Tracker(uri, "exp", spool, retry_after_s=0.0, background=background)
    tracker.declare("exp/t1", "t1", "trial")
    tracker.log_metrics("exp/t1", {"epoch": 1, "val_error": 0.5}, step=1)
    # MLflow refuses this metric name (INVALID_PARAMETER_VALUE): retrying can never succeed.
    tracker.log_metrics("exp/t1", {"epoch": 2, "bad?name": 1.0}, step=2)
    tracker.log_metrics("exp/t1", {"epoch": 3, "val_error": 0.3}, step=3)
    tracker.set_status("exp/t1", "finished")
    assert tracker.flush() and tracker.pending == 0
    message = tracker.close()
    rejected = tmp_path / "unlogged.rejected.jsonl"
    assert message == f"1 record(s) MLflow refused are in {rejected}"
    (record,) = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert (record["run"], record["kind"], record["step"]) == ("exp/t1", "metrics", 2)
    assert "INVALID_PARAMETER_VALUE" in record["error"] or "Invalid value" in record["error"]
    assert any("MLflow refused a metrics record of run exp/t1" in r.getMessage() for r in caplog.records)
    mlflow = MlflowClient(uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("exp").experiment_id])
    assert history(mlflow, run.info.run_id, "val_error") == [1, 3]
    assert run.data.tags["samtune.status"] == "finished" and not spool.exists()


class BlockedClient(FlakyClient):
    """A client whose `log_batch` waits until released, like a store busy with another writer."""

    def __init__(self, client):
        super().__init__(client)
        self.entered, self.release = threading.Event(), threading.Event()

    def log_batch(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(30), "never released"
        return self.client.log_batch(*args, **kwargs)


def test_a_background_tracker_never_makes_the_caller_wait_and_keeps_the_order(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "exp", tmp_path / "s.jsonl", background=True)
    tracker.client = client = BlockedClient(tracker.client)
    tracker.declare("exp/t1", "t1", "trial")
    tracker.log_metrics("exp/t1", {"epoch": 1, "val_error": 0.5}, step=1)
    assert client.entered.wait(30)  # the writer thread is stuck inside MLflow...
    for epoch in (2, 3):  # ...and the caller goes on: had these waited, the test would hang
        tracker.log_metrics("exp/t1", {"epoch": epoch, "val_error": 0.5 / epoch}, step=epoch)
    tracker.set_status("exp/t1", "finished")
    assert tracker.pending >= 3
    client.release.set()
    assert tracker.close() is None and tracker.pending == 0
    mlflow = MlflowClient(uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("exp").experiment_id])
    assert history(mlflow, run.info.run_id) == [1, 2, 3]
    assert [m.value for m in sorted(mlflow.get_metric_history(run.info.run_id, "val_error"), key=lambda m: m.step)] == [
        0.5,
        0.25,
        0.5 / 3,
    ]
    assert run.data.tags["samtune.status"] == "finished" and run.info.status == "FINISHED"


def test_discard_removes_the_store_it_created_and_only_that(tmp_path):
    new = tmp_path / "new.db"
    tracker = Tracker(f"sqlite:///{new}", "exp", tmp_path / "s.jsonl", background=True)
    tracker.wait_open()
    assert new.exists()
    tracker.discard()
    assert not new.exists()
    existing = tmp_path / "existing.db"
    Tracker(f"sqlite:///{existing}", "exp", tmp_path / "s.jsonl").close()
    again = Tracker(f"sqlite:///{existing}", "exp", tmp_path / "s.jsonl", background=True)
    again.wait_open()
    again.discard()
    assert existing.exists()


def test_a_store_that_cannot_be_opened_is_raised_by_wait_open(tmp_path):
    bad = tmp_path / "not-a-db"
    bad.write_text("this is not SQLite")
    tracker = Tracker(f"sqlite:///{bad}", "exp", tmp_path / "s.jsonl", background=True)
    with pytest.raises(Exception, match="(?i)not a database|file is encrypted"):  # SQLite's own words
        tracker.wait_open()
    # What a caller logs anyway is not lost: it is spooled, and the message names the spool.
    tracker.declare("exp", "exp", "sweep")
    tracker.log_params("exp", {"a": 1})
    message = tracker.close()
    assert "could not be opened" in message and str(tmp_path / "s.jsonl") in message
    (record,) = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert (record["run"], record["kind"], record["data"]) == ("exp", "params", {"a": "1"})
    tracker.discard()
    assert bad.read_text() == "this is not SQLite"


def test_a_trial_run_tune_never_heard_of_is_retired_not_counted(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "exp", tmp_path / "s.jsonl")
    tracker.declare("sw", "sw", "sweep")
    for cell in ("sw/cell-0", "sw/cell-1"):
        tracker.declare(cell, cell, "cell", parent="sw")
        for tid in ("aaa", "bbb", "ccc"):
            key = f"{cell}/{tid}"
            tracker.declare(key, tid, "trial", parent=cell, **{"samtune.trial_key": key, "samtune.status": "running"})
            tracker.log_metrics(key, {"epoch": 1}, step=1)
    # Tune restored cell-0 knowing aaa and ccc: bbb was started by the killed driver only.
    assert tracker.retire_unknown_trials("sw/cell-0", {"aaa", "ccc"}) == ["sw/cell-0/bbb"]
    assert tracker.close() is None
    mlflow = MlflowClient(uri)
    runs = {
        r.data.tags["samtune.key"]: r for r in mlflow.search_runs([mlflow.get_experiment_by_name("exp").experiment_id])
    }
    lost = runs["sw/cell-0/bbb"]
    assert lost.data.tags["samtune.role"] == "lost" and lost.data.tags["samtune.status"] == "lost"
    assert lost.info.status == "KILLED" and history(mlflow, lost.info.run_id) == [1]  # its epochs are kept
    trials = sorted(k for k, r in runs.items() if r.data.tags["samtune.role"] == "trial")
    assert trials == ["sw/cell-0/aaa", "sw/cell-0/ccc", "sw/cell-1/aaa", "sw/cell-1/bbb", "sw/cell-1/ccc"]


def test_the_spool_message_names_the_command_that_replays_it(tmp_path):
    tracker = Tracker(
        f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path / "s.jsonl", replay_hint="samtune sweep space.py --resume"
    )
    tracker.client = FlakyClient(tracker.client)
    tracker.client.down = True
    tracker.declare("exp", "exp", "sweep")
    tracker.log_params("exp", {"a": 1})
    assert tracker.close().endswith(f"saved in {tmp_path / 's.jsonl'}; `samtune sweep space.py --resume` writes them")


def test_a_run_key_with_a_quote_is_found_again(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for epoch in (1, 2):  # two drivers, one run
        tracker = Tracker(uri, "exp", tmp_path / "s.jsonl")
        tracker.declare("it's/t1", "t1", "trial")
        tracker.log_metrics("it's/t1", {"epoch": epoch}, step=epoch)
        assert tracker.close() is None
    mlflow = MlflowClient(uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("exp").experiment_id])
    assert history(mlflow, run.info.run_id) == [1, 2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_tracking_server_going_away_mid_sweep_does_not_stop_training(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--workers",
            "1",
            "--default-artifact-root",
            (tmp_path / "artifacts").as_uri(),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    sweep = None
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except Exception:  # noqa: BLE001
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        root = Path(__file__).resolve().parents[1]
        # The server stays away: the sweep's end waits 2 s for it, not the default 2 minutes.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SAMTUNE_STORE_WAIT_S": "2"}
        env.pop("MLFLOW_TRACKING_URI", None)
        sweep = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "samtune.cli",
                "sweep",
                str(root / "search_spaces/noisy_digits.py"),
                "--set",
                "name=away",
                "--set",
                "confirm_seeds=0",
                "--set",
                "model=mlp",
                "--set",
                "batch_size=128",
                "--set",
                "epochs=6",
                "--set",
                "trials=2",
                "--set",
                "label_noise_rates=0.2",
                "--set",
                "grace_period=6",
                "--set",
                "fixed.sharpness_measures=",
                "--storage-path",
                str(tmp_path / "runs"),
                "--tracking-uri",
                uri,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        client = MlflowClient(uri)
        deadline = time.time() + 300
        while True:  # wait for a trial's run to reach the server, then take the server away
            exp = client.get_experiment_by_name("away")
            if exp is not None and client.search_runs(
                [exp.experiment_id], filter_string="tags.`samtune.role` = 'trial'"
            ):
                break
            assert time.time() < deadline and sweep.poll() is None, "no trial reached the server"
            time.sleep(0.2)
        # The driver (the only process that writes to MLflow) is held still while the server
        # stops, so the server is gone before the trial's later epochs can be written however
        # fast this machine trains; its trials keep running meanwhile.
        os.kill(sweep.pid, signal.SIGSTOP)
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        finally:
            os.kill(sweep.pid, signal.SIGCONT)
        out, _ = sweep.communicate(timeout=600)
    finally:
        for proc in (server, sweep):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    # Ran to the end, but the store is not complete: not a success to a script (exit 3).
    assert sweep.returncode == 3, out[-4000:]
    # (Its last attempt outlasts the 2 s wait against a dead server: no retry line to expect.)
    assert "not in MLflow yet" in out
    spool = tmp_path / "runs" / "away" / "mlflow-unlogged.jsonl"
    assert "could not be reached" in out and str(spool) in out
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    spooled = {(r["run"], r["step"]) for r in records if r["kind"] == "metrics"}
    assert spooled, "the server went away before the trials ended, yet nothing was spooled"
    # Both trials trained to the end and nothing was lost: every epoch of each is on the server
    # (read from its store, now that it is stopped) or in the spool, the last ones in the spool.
    stored = MlflowClient(f"sqlite:///{tmp_path}/server.db")
    (exp,) = [e for e in stored.search_experiments() if e.name == "away"]
    on_server = {
        run.data.tags["samtune.trial_key"]: {m.step for m in stored.get_metric_history(run.info.run_id, "epoch")}
        for run in stored.search_runs([exp.experiment_id], filter_string="tags.`samtune.role` = 'trial'")
    }
    trial_keys = set(on_server) | {r["run"] for r in records if r["tags"].get("samtune.role") == "trial"}
    assert len(trial_keys) == 2
    for key in trial_keys:
        in_spool = {step for run_key, step in spooled if run_key == key}
        assert on_server.get(key, set()) | in_spool == set(range(1, 7)), (key, on_server.get(key), in_spool)
    assert max(step for _, step in spooled) == 6
    assert "the search's picks per cell" in out


def test_a_new_store_and_the_data_cache_are_their_owners_only(tmp_path):
    """mlflow.db holds every run; the cache holds the decoded dataset: neither world-readable,
    whatever the umask (SQLite and torch.save would follow it: 0644 under the usual one)."""
    import torch

    from samtune.data.cache import cached

    old = os.umask(0o022)
    try:
        tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", tmp_path / "s.jsonl", background=True)
        tracker.wait_open()
        tracker.close()
        store = tmp_path / "mlflow.db"
        assert store.stat().st_size > 0 and store.stat().st_mode & 0o077 == 0
        cache = tmp_path / "cache"
        tensors = {
            "train_x": torch.zeros(2, 1),
            "train_y": torch.zeros(2, dtype=torch.long),
            "test_x": torch.zeros(1, 1),
            "test_y": torch.zeros(1, dtype=torch.long),
            "classes": ["a"],
        }
        cached("digits", tmp_path / "s.jsonl", "f" * 64, lambda: tensors, cache)
        (written,) = cache.glob("*.samtune.pt")
        assert written.stat().st_mode & 0o077 == 0 and cache.stat().st_mode & 0o077 == 0
    finally:
        os.umask(old)


def _open_new_store(uri, barrier, results):
    from samtune.sweep.store import new_sqlite_file, open_client

    barrier.wait()  # every process opens the new store at the same moment
    try:
        client = open_client(uri, new_sqlite_file(uri))
        client.create_experiment(f"e{os.getpid()}")
        results.put("ok")
    except Exception as exc:  # noqa: BLE001  the failure is what the test reports
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_processes_opening_one_new_sqlite_store_together_all_get_it(tmp_path):
    # MLflow creates a new SQLite store's tables on first use, unlocked: without samtune's lock
    # at least one of three processes failed here ("table ... already exists") in every try.
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_new_store, args=(uri, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert sorted(results.get(timeout=5) for _ in procs) == ["ok"] * 3
    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {n for n in names if n.startswith("e")} and len(names) == 4  # the three and Default
    assert (tmp_path / "mlflow.db").stat().st_mode & 0o777 == 0o600


def _trial_runs_in(path):
    """How many trial runs a SQLite store holds, 0 while it is being created."""
    import sqlite3

    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            query = "select count(*) from tags where key = 'samtune.role' and value = 'trial'"
            return db.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


def _hold_exclusive_lock(path, seconds):
    """Another process's exclusive SQLite lock on `path`, released after `seconds` (a thread)."""
    import sqlite3

    held = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    held.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(seconds, lambda: (held.execute("COMMIT"), held.close()))
    release.start()
    return release


@pytest.mark.slow
def test_the_end_waits_quietly_for_a_store_locked_for_a_while(tmp_path, caplog, capfd):
    # MLflow itself waits 20 s on a locked SQLite file (its busy_timeout) before a write fails:
    # a lock held 25 s fails the writes, and the end of the sweep waits for it to go.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spool = tmp_path / "unlogged.jsonl"
    tracker = Tracker(uri, "exp", spool, retry_after_s=60.0)
    tracker.declare("exp", "exp", "sweep")
    tracker.log_params("exp", {"lr": 0.1})
    assert tracker.flush()
    release = _hold_exclusive_lock(tmp_path / "mlflow.db", 25.0)
    for epoch in (1, 2, 3):
        tracker.log_metrics("exp", {"epoch": epoch}, step=epoch)
    tracker.set_status("exp", "finished")
    assert tracker.pending == 4 and spool.exists()  # the store refused them while locked
    message = tracker.close(wait_s=120.0)
    release.join()
    assert message is None, message
    assert not spool.exists()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert history(client, run.info.run_id) == [1, 2, 3] and run.info.status == "FINISHED"
    warnings = [r.getMessage() for r in caplog.records if r.name == "samtune.sweep.tracking"]
    # MLflow's own wait may outlast the lock at the end: then the end has nothing to say.
    assert sum("retrying for up to" in w for w in warnings) <= 1, warnings
    # One line per event, never MLflow's two tracebacks per failed statement.
    assert not [r for r in caplog.records if r.name.startswith("mlflow")]
    assert "Traceback" not in capfd.readouterr().err


def test_a_store_still_down_after_the_wait_is_named_with_what_is_left(tmp_path, caplog):
    spool = tmp_path / "unlogged.jsonl"
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", spool, replay_hint="samtune sweep s.py --resume")
    flaky = FlakyClient(tracker.client)
    tracker.client = flaky
    tracker.declare("exp", "exp", "sweep")
    assert tracker.flush()
    flaky.down = True
    tracker.log_metrics("exp", {"epoch": 1}, step=1)
    start = time.monotonic()
    message = tracker.close(wait_s=2.0)
    assert 2.0 <= time.monotonic() - start < 10
    assert message is not None and "1 record(s)" in message and str(spool) in message
    assert "samtune sweep s.py --resume" in message
    warnings = [r.getMessage() for r in caplog.records if "retrying for up to" in r.getMessage()]
    assert len(warnings) == 1 and "tracking server unreachable" in warnings[0]


@pytest.mark.slow
def test_a_sweep_whose_store_is_locked_for_a_minute_ends_complete(tmp_path):
    # Another process (a backup, a second UI) holds the SQLite store exclusively for 45 s while
    # the sweep trains: records wait, the end waits for the lock to go, and the sweep exits 0
    # with every run finished and its report built, with no traceback on the way.
    root = Path(__file__).resolve().parents[1]
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAMTUNE_STORE_WAIT_S": "120"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "samtune.cli", "sweep", str(root / "search_spaces/noisy_digits.py")]
    for setting in (
        "name=locked",
        "model=mlp",
        "batch_size=128",
        # Long enough (about a minute) that its writes outlast MLflow's own 20 s wait on the lock.
        "epochs=16",
        "trials=2",
        "label_noise_rates=0.2",
        "grace_period=16",
        "confirm_seeds=2",
        "max_confirm_seeds=2",
        "ablations=",
        "fixed.sharpness_measures=",
    ):
        command += ["--set", setting]
    command += ["--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri]
    sweep = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while True:  # lock the store once a trial's run is in it (read with sqlite3 alone: an
            # MLflow client here would race the sweep creating the store's tables)
            if _trial_runs_in(store / "mlflow.db"):
                break
            if sweep.poll() is not None or time.time() > deadline:
                pytest.fail(f"no trial reached the store: {sweep.communicate(timeout=60)[0][-3000:]}")
            time.sleep(0.2)
        release = _hold_exclusive_lock(store / "mlflow.db", 45.0)
        out, _ = sweep.communicate(timeout=600)
        release.join()
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 0, out[-4000:]
    at = out.find("Traceback")
    assert at < 0, out[max(at - 1500, 0) : at + 2500]
    # Whether a write outlasted MLflow's own 20 s wait depends on this machine's pace; either way
    # nothing is lost and nothing buries the output (the retries are tested with a 25 s lock above).
    assert not (tmp_path / "runs" / "locked" / "mlflow-unlogged.jsonl").exists()
    assert "Report written to" in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("locked").experiment_id])
    assert len(runs) >= 1 + 1 + 2 + 2 * 2  # sweep, cell, trials (and baselines), confirmations
    assert {run.info.status for run in runs} == {"FINISHED"}

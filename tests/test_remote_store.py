"""A sweep against a remote MLflow server whose artifacts live in object storage, as cloud
clusters run MLflow: `mlflow server --artifacts-destination s3://...` (proxied artifacts) on an
S3 API server (moto, `object_store.s3_server`), both on 127.0.0.1.

The sweep's client holds no storage credentials: every artifact (the report, the verdicts, the
picks' models) goes through the server into the bucket, and nothing but the sweep's own folder
is written on the client's disk. A tracking URI with a password and the storage keys appear in no
message, saved file, MLflow param or tag. The server lost mid-sweep: what it did not take,
artifacts included, is spooled, and ``--resume`` lands it in the bucket once the server is back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from object_store import ACCESS_KEY, SECRET_KEY, S3Server, free_port

from samtune import cli
from samtune.contract.messages import masked
from samtune.sweep.store import check_tracking_uri, resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "noisy_digits.py"
#: The tracking URI's password in these tests: it must be found nowhere samtune writes.
PASSWORD = "pw-samtune-remote-5e1d09"
SECRETS = (PASSWORD, SECRET_KEY, ACCESS_KEY)

# Small: 2 cells of 2 trials of 2 epochs, and the confirmation on 2 seeds, so the sweep has
# verdicts; no sharpness, no ablation curves.
TINY = (
    "--set", "model=mlp", "--set", "batch_size=128", "--set", "epochs=2", "--set", "trials=2",
    "--set", "grace_period=2", "--set", "confirm_seeds=2", "--set", "max_confirm_seeds=2",
    "--set", "ablations=", "--set", "fixed.sharpness_measures=",
)  # fmt: skip


class Server:
    """`mlflow server` on 127.0.0.1:`port`, its runs in a SQLite file and its artifacts proxied
    to ``s3://<bucket>/mlflow``; started in a session of its own, stopped by its id."""

    def __init__(self, folder: Path, port: int, bucket: str):
        self.folder, self.port, self.bucket = folder, port, bucket
        self.proc: subprocess.Popen | None = None
        folder.mkdir(exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
            "--artifacts-destination", f"s3://{self.bucket}/mlflow",
        ]  # fmt: skip
        with open(self.folder / "server.log", "a") as log:
            # Its environment is this process's: the S3 endpoint and keys `s3_server` set.
            self.proc = subprocess.Popen(
                cmd, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return
            except Exception:  # noqa: BLE001
                assert time.monotonic() < deadline and self.proc.poll() is None, "mlflow server did not start"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path, s3_server):
    server = Server(tmp_path / "server", free_port(), s3_server.bucket)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client_env(with_storage_keys: bool = False) -> dict[str, str]:
    """The sweep's environment: no storage endpoint or keys unless asked (the server proxies the
    artifacts), no tracking URI or Ray address of the test's own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS") + (
        ()
        if with_storage_keys
        else ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")
    ):
        env.pop(key, None)
    return env


def samtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "samtune.cli", *args]


def sweep_args(folder: Path, name: str, *extra: str) -> list[str]:
    return samtune("sweep", str(SPACE), "--set", f"name={name}", *extra, "--storage-path", str(folder / "runs"))


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret is in {where}"


def assert_no_secret_in_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in SECRETS:
                assert secret.encode() not in data, f"a secret is in {path}"


def run_named(client: MlflowClient, experiment_id: str, **tags: str):
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment_id], filter_string=where, max_results=1000)


def artifact_keys(s3: S3Server, experiment_id: str, run_id: str) -> set[str]:
    prefix = f"mlflow/{experiment_id}/{run_id}/artifacts/"
    return {key.removeprefix(prefix) for key in s3.keys(prefix)}


@pytest.mark.slow
def test_a_sweep_on_a_remote_server_keeps_its_artifacts_in_object_storage_and_no_secret(
    tmp_path, s3_server, mlflow_server
):
    uri = f"http://samtune:{PASSWORD}@127.0.0.1:{mlflow_server.port}"
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    proc = subprocess.run(
        sweep_args(client_dir, "remote", *TINY, "--set", "label_noise_rates=0.0,0.4", "--tracking-uri", uri),
        cwd=client_dir,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert_no_secret(out, "the sweep's output")
    assert f"samtune:***@127.0.0.1:{mlflow_server.port}" in out  # named, masked
    sweep_dir = client_dir / "runs" / "remote"
    assert json.loads((sweep_dir / "sweep.json").read_text())["tracking_uri"] == masked(uri)

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("remote")
    (sweep,) = run_named(client, experiment.experiment_id, **{"samtune.role": "sweep"})
    cells = run_named(client, experiment.experiment_id, **{"samtune.role": "cell"})
    assert len(cells) == 2
    # Proxied: the runs' artifacts are the server's to store, not a path of this machine.
    assert sweep.info.artifact_uri.startswith("mlflow-artifacts:")
    # The verdicts and the report, on the sweep's run, in the bucket.
    on_sweep = artifact_keys(s3_server, experiment.experiment_id, sweep.info.run_id)
    assert {"verdicts.json", "verdicts.md", "report/index.html", "report/trials.csv"} <= on_sweep
    page = (
        s3_server.client()
        .get_object(
            Bucket=s3_server.bucket,
            Key=f"mlflow/{experiment.experiment_id}/{sweep.info.run_id}/artifacts/report/index.html",
        )["Body"]
        .read()
        .decode()
    )
    assert masked(uri) in page
    assert_no_secret(page, "the report")
    # Each cell's picks hold their models, in the bucket; each cell's data is its dataset input.
    for cell in cells:
        picks = dict(p.split(":", 1) for p in cell.data.tags["samtune.picks"].split(","))
        assert set(picks) >= {"best_sgd", "best_sam"}
        for trial_key in picks.values():
            (trial,) = run_named(client, experiment.experiment_id, **{"samtune.trial_key": trial_key})
            kept = artifact_keys(s3_server, experiment.experiment_id, trial.info.run_id)
            assert {"model/MLmodel", "model/data/model.pth"} <= kept, kept
            assert [a.path for a in client.list_artifacts(trial.info.run_id)] == ["model"]  # served back
        (dataset,) = client.get_run(cell.info.run_id).inputs.dataset_inputs
        assert dataset.dataset.name.endswith(cell.data.tags["samtune.cell"])
    # No secret in any param or tag of any run of the sweep.
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        assert_no_secret(json.dumps([run.data.params, run.data.tags]), f"run {run.info.run_name}")
    # Nothing written on the client's disk but its sweep folder (and the driver's lock beside
    # it), which holds no secret; the server wrote no artifact of its own either (mlartifacts/
    # is where it keeps them locally).
    assert [p.name for p in client_dir.iterdir()] == ["runs"]
    assert sorted(p.name for p in (client_dir / "runs").iterdir()) == [".remote.driver.lock", "remote"]
    assert_no_secret_in_files(sweep_dir)
    assert not (mlflow_server.folder / "mlartifacts").exists()

    # The report rebuilt against the server (by a user whose shell has the storage keys): its
    # files land in the bucket again.
    report_prefix = f"mlflow/{experiment.experiment_id}/{sweep.info.run_id}/artifacts/report/"
    for key in s3_server.keys(report_prefix):
        s3_server.client().delete_object(Bucket=s3_server.bucket, Key=key)
    report = subprocess.run(
        samtune("report", "remote", "--tracking-uri", uri, "--out", str(tmp_path / "rebuilt")),
        cwd=client_dir,
        env=client_env(with_storage_keys=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, (report.stdout + report.stderr)[-3000:]
    assert_no_secret(report.stdout + report.stderr, "the report's output")
    assert {"index.html", "trials.csv"} <= {k.removeprefix(report_prefix) for k in s3_server.keys(report_prefix)}
    assert_no_secret((tmp_path / "rebuilt" / "index.html").read_text(), "the rebuilt report")

    # `samtune ui` on a server: the server serves the UI; it prints the address of the sweep's
    # runs there, without the login, and that page is served.
    ui = subprocess.run(
        samtune("ui", "remote", "--tracking-uri", uri), env=client_env(), capture_output=True, text=True, timeout=120
    )
    assert ui.returncode == 0, ui.stdout + ui.stderr
    assert_no_secret(ui.stdout + ui.stderr, "the ui's output")
    address = ui.stdout.splitlines()[-1].removeprefix("sweep 'remote': ")
    assert address == (
        f"http://127.0.0.1:{mlflow_server.port}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    )
    with urllib.request.urlopen(address.split("#")[0], timeout=30) as response:
        assert response.status == 200 and "<html" in response.read().decode().lower()

    # --resume without the URI: sweep.json kept it masked, so it is asked for, in one line.
    resumed = subprocess.run(
        sweep_args(client_dir, "remote", *TINY, "--set", "label_noise_rates=0.0,0.4", "--resume"),
        cwd=client_dir,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 2, resumed.stdout + resumed.stderr
    assert resumed.stderr.count("\n") == 1 and "credentials are masked" in resumed.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in resumed.stderr
    assert_no_secret(resumed.stdout + resumed.stderr, "the refused resume's output")


@pytest.mark.slow
def test_a_server_lost_mid_sweep_gets_the_spooled_artifacts_into_the_bucket_on_resume(
    tmp_path, s3_server, mlflow_server
):
    args = (*TINY, "--set", "confirm_seeds=0", "--set", "epochs=6", "--set", "grace_period=6")
    args += ("--set", "label_noise_rates=0.2")
    sweep = subprocess.Popen(
        sweep_args(tmp_path, "away", *args, "--tracking-uri", mlflow_server.uri),
        cwd=tmp_path,
        env={**client_env(), "SAMTUNE_STORE_WAIT_S": "2"},  # the server stays away: wait 2 s, not 2 min
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        client = MlflowClient(mlflow_server.uri)
        deadline = time.monotonic() + 300
        while True:  # a trial's run reaches the server, then the server goes away
            exp = client.get_experiment_by_name("away")
            if exp is not None and run_named(client, exp.experiment_id, **{"samtune.role": "trial"}):
                break
            assert time.monotonic() < deadline and sweep.poll() is None, "no trial reached the server"
            time.sleep(0.2)
        # The driver (the one process that writes to MLflow) held still while the server stops:
        # it is gone before the trials' later epochs and the picks' models can be written.
        os.kill(sweep.pid, signal.SIGSTOP)
        try:
            mlflow_server.stop()
        finally:
            os.kill(sweep.pid, signal.SIGCONT)
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert sweep.returncode == 3, out[-4000:]  # trained to the end; records wait in the spool
    spool = tmp_path / "runs" / "away" / "mlflow-unlogged.jsonl"
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    models = {r["run"] for r in records if r["kind"] == "artifacts"}
    assert len(models) == 2, records  # best SGD's and best SAM's models, not written

    mlflow_server.start()  # back, on the same port, store and bucket
    resumed = subprocess.run(
        sweep_args(tmp_path, "away", *args, "--resume"),
        cwd=tmp_path,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert not spool.exists()
    exp = client.get_experiment_by_name("away")
    trials = run_named(client, exp.experiment_id, **{"samtune.role": "trial"})
    by_key = {t.data.tags["samtune.trial_key"]: t for t in trials}
    for key in models:
        kept = artifact_keys(s3_server, exp.experiment_id, by_key[key].info.run_id)
        assert {"model/MLmodel", "model/data/model.pth"} <= kept, (key, kept)
    # Every epoch of both trials reached the server in the end, once each.
    for trial in trials:
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "epoch")]
        assert sorted(steps) == list(range(1, 7)), steps
    (sweep_run,) = run_named(client, exp.experiment_id, **{"samtune.role": "sweep"})
    assert "report/index.html" in artifact_keys(s3_server, exp.experiment_id, sweep_run.info.run_id)


# ------------------------------------------------------------------------------ secrets, fast


def test_a_saved_masked_uri_is_refused_in_one_line_unless_the_environment_has_it(monkeypatch):
    real = f"http://samtune:{PASSWORD}@127.0.0.1:9"
    saved = masked(real)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(saved) == saved
    with pytest.raises(ValueError) as refused:
        check_tracking_uri(saved)
    assert "credentials are masked" in str(refused.value) and "\n" not in str(refused.value)
    assert PASSWORD not in str(refused.value)
    # The same URI, with its password, in MLflow's own variable: taken from there.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", real)
    assert resolve_tracking_uri(saved) == real
    # Another URI there is not this one.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://samtune:other@127.0.0.1:10")
    assert resolve_tracking_uri(saved) == saved


def test_the_health_check_of_a_server_with_a_login_in_its_uri_reaches_it(mlflow_server_plain):
    # urllib takes "user:password@host" for a host name; the check asks without the login.
    check_tracking_uri(f"http://samtune:{PASSWORD}@127.0.0.1:{mlflow_server_plain}")


@pytest.fixture
def mlflow_server_plain():
    """A bare HTTP server on 127.0.0.1 answering /health, as a tracking server does."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's name is http.server's
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_refusals_name_the_server_but_no_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://samtune:{PASSWORD}@127.0.0.1:9"
    for argv in (["report", "remote", "--tracking-uri", uri], ["ui", "--tracking-uri", uri]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert_no_secret(out + err, " ".join(argv[:1]))
        assert err.count("\n") == 1 and "http://samtune:***@127.0.0.1:9" in err, err
    # A pyarrow-style storage URI's keys, in a refusal of a store no MLflow serves.
    assert (
        cli.main(["report", "x", "--tracking-uri", f"s3://sweeps/x?access_key={ACCESS_KEY}&secret_key={SECRET_KEY}"])
        == 2
    )
    out, err = capsys.readouterr()
    assert_no_secret(out + err, "a refusal of an s3 URI")
    assert "secret_key=***" in err and re.search(r"^samtune: error: ", err)


def test_a_lost_server_with_a_login_is_named_without_it_in_warnings_the_spool_and_the_end(tmp_path, caplog):
    from samtune.sweep.tracking import Tracker

    uri = f"http://samtune:{PASSWORD}@127.0.0.1:{free_port()}"  # nothing listens there
    spool = tmp_path / "runs" / "mlflow-unlogged.jsonl"
    with caplog.at_level("WARNING", logger="samtune.sweep.tracking"):
        tracker = Tracker(uri, "lost", spool, replay_hint="samtune sweep x.py --resume")
        tracker.declare("lost@1", "lost 1", "sweep")
        tracker.log_params("lost@1", {"lr": 0.1})
        message = tracker.close(wait_s=0)
    # MLflow names the URL a request failed on; the tracker passes that on, masked.
    assert message is not None and "http://samtune:***@127.0.0.1" in message, message
    assert any("http://samtune:***@127.0.0.1" in r.getMessage() for r in caplog.records)
    assert_no_secret(message + "\n".join(r.getMessage() for r in caplog.records), "the tracker's messages")
    assert spool.exists()
    assert_no_secret_in_files(tmp_path)

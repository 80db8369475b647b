"""`samtune ui`: the address it prints opens the MLflow UI on the sweep's training runs.

The browser check loads the printed address in headless Chromium (the UI is a JavaScript page:
only a browser shows which view it opened) and, as a control, the UI's front page on the same
experiment without it, which MLflow 3 opens on its GenAI traces: the check would otherwise pass
if the UI showed runs everywhere.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from samtune import cli
from samtune.contract.tags import (
    DESCRIPTION_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    ROLE_TAG,
)

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


def make_store(folder: Path, sweeps: list[str]) -> str:
    """A local store with one experiment per sweep, laid out as a sweep writes it (its kind
    tag, a sweep run carrying the verdict in its description, a cell run under it), and one
    experiment that is not a sweep."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("not-a-sweep")
    for name in sweeps:
        experiment = client.create_experiment(name)
        client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        sweep = client.create_run(
            experiment, run_name=f"{name}-sweep", tags={ROLE_TAG: "sweep", DESCRIPTION_TAG: "SAM lower by 0.068"}
        )
        cell = client.create_run(
            experiment,
            run_name=f"{name}-cell-noise-0.4",
            tags={ROLE_TAG: "cell", "mlflow.parentRunId": sweep.info.run_id},
        )
        client.log_metric(cell.info.run_id, "test_error", 0.05)
        for run in (cell, sweep):
            client.set_terminated(run.info.run_id)
        time.sleep(0.01)  # creation times in order
    del mlflow
    return uri


def test_ui_prints_the_address_of_the_newest_sweeps_training_runs(monkeypatch, tmp_path, capsys):
    uri = make_store(tmp_path, ["older", "newer"])
    monkeypatch.setattr("samtune.cli.serve", lambda cmd: 0)
    assert cli.main(["ui", "--tracking-uri", uri, "--port", "5123"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "sweep 'newer': http://127.0.0.1:5123/#/experiments/3?workflowType=machine_learning"
    assert cli.main(["ui", "older", "--tracking-uri", uri, "--port", "5123"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("/#/experiments/2?workflowType=machine_learning")


def test_ui_refuses_an_unknown_sweep_in_one_line_naming_the_sweeps(monkeypatch, tmp_path, capsys):
    uri = make_store(tmp_path, ["noisy-digits"])
    monkeypatch.setattr("samtune.cli.serve", lambda cmd: pytest.fail("the server must not start"))
    assert cli.main(["ui", "not-a-sweep", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sweep named 'not-a-sweep'" in err and "['noisy-digits']" in err


def test_ui_refuses_a_host_beyond_this_machine_unless_told_to_expose_it(monkeypatch, tmp_path, capsys):
    uri = make_store(tmp_path, ["noisy-digits"])
    started = []
    monkeypatch.setattr("samtune.cli.serve", lambda cmd: started.append(cmd) or 0)
    assert cli.main(["ui", "--tracking-uri", uri, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host 0.0.0.0" in err and "no login" in err and "--expose" in err
    assert not started
    free = _free_port()
    assert cli.main(["ui", "--tracking-uri", uri, "--host", "0.0.0.0", "--expose", "--port", str(free)]) == 0
    assert started and started[0][started[0].index("--host") + 1] == "0.0.0.0"


def test_ui_refuses_a_port_already_in_use_in_one_line_before_serving(monkeypatch, tmp_path, capsys):
    uri = make_store(tmp_path, ["noisy-digits"])
    monkeypatch.setattr("samtune.cli.serve", lambda cmd: pytest.fail("the server must not start"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert cli.main(["ui", "--tracking-uri", uri, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}" in err and "another --port" in err
    assert "MLflow UI on" not in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_on_a_store_without_sweeps_points_at_the_experiment_list(monkeypatch, tmp_path, capsys):
    uri = make_store(tmp_path, [])
    monkeypatch.setattr("samtune.cli.serve", lambda cmd: 0)
    assert cli.main(["ui", "--tracking-uri", uri, "--port", "5123"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "the sweeps: http://127.0.0.1:5123/#/experiments?workflowType=machine_learning"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendered(url: str, until: str) -> str:
    """The DOM of `url` after its scripts ran, in a fresh headless Chromium profile, loaded again
    (at most three times) until it holds `until`: on a loaded machine the page's data requests
    can outlast one load."""
    for _ in range(3):
        # A short profile path: Chromium's profile lock is a socket, whose path has a length limit.
        with tempfile.TemporaryDirectory(prefix="ui-") as profile:
            dom = _load(url, Path(profile))
        if until in dom:
            break
    return dom


def _text(dom: str) -> str:
    """The words a reader sees on the page: no markup, styles or scripts."""
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def _load(url: str, folder: Path) -> str:
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={folder}",
            "--virtual-time-budget=20000",
            "--window-size=1280,1000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed here (CI installs Debian's chromium)")
def test_the_printed_address_opens_the_sweeps_runs_in_a_browser(tmp_path):
    uri = make_store(tmp_path, ["noisy-digits"])
    port = _free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "samtune.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = None
        deadline = time.time() + 120
        while address is None:
            line = ui.stdout.readline()
            assert line and time.time() < deadline, "samtune ui ended without printing the address"
            found = re.search(r"sweep 'noisy-digits': (http://\S+)", line)
            address = found and found.group(1)
        while True:  # until the server answers
            assert ui.poll() is None and time.time() < deadline
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        runs = _text(_rendered(address, until="noisy-digits-sweep"))
        front = _text(_rendered(address.split("?")[0], until="Sessions"))
    finally:
        ui.terminate()
        ui.wait(timeout=60)
    # The printed address: the experiment's runs table, the sweep run in it with its cell run
    # nested under it (folded), both counted.
    assert "noisy-digits-sweep" in runs and "2 matching runs" in runs
    # The control: the same experiment without the parameter opens on the GenAI overview (its
    # traces and chat sessions), no runs.
    assert "Sessions" in front and "noisy-digits-sweep" not in front and "matching runs" not in front

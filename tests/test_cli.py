"""The `samtune` command: check, train, report and ui, run through `samtune.cli.main`.

`sweep` runs end to end in test_sweep.py; its user mistakes are in test_bad_input.py.
"""

import json
import os
from pathlib import Path

import pytest

from samtune import cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.py"))
DIGITS = str(ROOT / "search_spaces" / "noisy_digits.py")


@pytest.fixture(autouse=True)
def in_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_check_accepts_every_shipped_space_file(path, capsys):
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ok: sweep ")
    # What is searched is listed; constants the space returns are not "searching".
    searched = out.splitlines()[0].split("searching ")[1].strip().split(", ")
    assert {"lr", "optimizer", "rho", "m"} <= set(searched) and "momentum" not in searched


def test_check_applies_overrides_before_judging(capsys):
    assert cli.main(["check", DIGITS, "--set", "label_noise_rates=0.1,0.3", "--trials", "3"]) == 0
    assert "2 cell(s) (noise=0.1, noise=0.3), 3 trials each" in capsys.readouterr().out
    # m=16 in the space no longer divides a batch of 24: the override is judged with the space.
    assert cli.main(["check", DIGITS, "--set", "batch_size=24"]) == 2
    assert "m=16 does not divide the per-worker batch 24" in capsys.readouterr().err


def test_train_runs_the_trial_a_sweep_would_run_in_the_chosen_cell(capsys):
    # The documented example: rho and m without an optimizer mean SAM (the space asks for one).
    code = cli.main(
        [
            "train",
            DIGITS,
            "--params",
            "rho=0.05,m=16,lr=0.1",
            "--cell",
            "0.4",
            "--set",
            "model=mlp",
            "--set",
            "epochs=2",
            "--set",
            "fixed.sharpness_measures=",
            "--json",
        ]
    )
    assert code == 0
    epochs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    # Only SAM trials report how many examples one perturbation came from.
    assert all(e["m_effective"] == 16 for e in epochs)
    last = epochs[-1]
    assert 0.0 <= last["val_error"] <= 1.0 and 0.0 <= last["test_error"] <= 1.0
    # The cell's 40% symmetric noise is in the labels trained on: a model that learned the digits
    # agrees with the true labels more often than with the noisy ones.
    assert last["train_acc_true"] > 0.5 and last["train_acc_true"] - last["train_acc_noisy"] > 0.2


def test_train_names_what_the_space_still_needs(capsys):
    assert cli.main(["train", DIGITS, "--params", "optimizer=sam,lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "samtune: error: --params: the space asks for 'rho' in this branch; add it, e.g. --params rho=..."


def test_train_says_which_optimizer_rho_alone_implies(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("samtune.cli.fit", lambda config, **kw: seen.append(config) or {})
    assert cli.main(["train", "--params", "rho=0.1,lr=0.1", "--set", "epochs=1"]) == 0
    assert cli.main(["train", "--params", "optimizer=asam,rho=0.1"]) == 0  # an explicit choice stands
    assert [c["optimizer"] for c in seen] == ["sam", "asam"]
    assert capsys.readouterr().out.startswith("trial: epochs=1 lr=0.1 optimizer=sam rho=0.1")


def fake_sweep(monkeypatch, tmp_path, outcome=None):
    """`samtune sweep` up to the end of its trials, without Ray: a plan for `DIGITS` whose
    run_sweep returns no cells (or raises `outcome`)."""
    import samtune.cli
    from samtune.sweep.plan import Plan
    from samtune.sweep.space_file import load_space

    sweep, space = load_space(DIGITS)
    plan = Plan(
        sweep, space, DIGITS, tmp_path / "runs" / sweep.name, f"sqlite:///{tmp_path}/mlflow.db", None, False, "abc123"
    )

    def run_sweep(plan, view=None):
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        (plan.sweep_dir / "sweep.json").write_text("{}")
        if outcome is not None:
            raise outcome
        return []

    monkeypatch.setattr(samtune.cli, "prepare", lambda *a, **k: plan)
    monkeypatch.setattr(samtune.cli, "run_sweep", run_sweep)
    return plan


def test_a_sweep_ends_by_building_its_report_and_saying_where_it_is(monkeypatch, tmp_path, capsys):
    plan = fake_sweep(monkeypatch, tmp_path)
    calls = []

    def build(experiment, tracking_uri=None, out=None, **kwargs):
        calls.append((experiment, tracking_uri, out))
        return Path(out) / "index.html"

    monkeypatch.setattr("samtune.cli.build", build)
    assert cli.main(["sweep", DIGITS]) == 0
    report = tmp_path / "runs" / "noisy-digits" / "report-abc123"
    assert calls == [("noisy-digits", plan.tracking_uri, report)]
    out = capsys.readouterr().out
    assert f"Report written to {report}/index.html" in out
    # --no-report: no report, and the command that draws it later, into the same folder.
    assert cli.main(["sweep", DIGITS, "--no-report"]) == 0 and len(calls) == 1
    assert f"samtune report noisy-digits --tracking-uri {plan.tracking_uri} --out {report}" in capsys.readouterr().out


def test_sweeps_of_one_name_keep_their_own_reports(monkeypatch, tmp_path, capsys):
    """Two sweeps named alike, in two storage folders and two stores: neither report replaces
    the other, and each sweep says where its own is."""
    import dataclasses

    import samtune.cli

    first = fake_sweep(monkeypatch, tmp_path)
    second = dataclasses.replace(
        first,
        sweep_dir=tmp_path / "elsewhere" / "noisy-digits",
        tracking_uri=f"sqlite:///{tmp_path}/other.db",
        sweep_id="def456",
    )

    def build(experiment, tracking_uri=None, out=None, **kwargs):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "index.html").write_text(tracking_uri)
        return Path(out) / "index.html"

    monkeypatch.setattr("samtune.cli.build", build)
    printed = []
    for plan in (first, second):
        monkeypatch.setattr(samtune.cli, "prepare", lambda *a, plan=plan, **k: plan)
        assert cli.main(["sweep", DIGITS]) == 0
        printed.append(capsys.readouterr().out)
    pages = [p.read_text() for p in sorted(tmp_path.rglob("index.html"))]
    assert sorted(pages) == sorted([first.tracking_uri, second.tracking_uri])
    for plan, out in zip((first, second), printed):
        assert f"Report written to {plan.sweep_dir}/report-{plan.sweep_id}/index.html" in out


def test_a_report_that_fails_leaves_the_sweep_a_success_and_says_how_to_retry(monkeypatch, tmp_path, capsys):
    from samtune.report.runs import ReportError

    plan = fake_sweep(monkeypatch, tmp_path)

    def build(*args, **kwargs):
        raise ReportError("no views folder")

    monkeypatch.setattr("samtune.cli.build", build)
    assert cli.main(["sweep", DIGITS]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (
        "samtune: the sweep is complete but its report could not be built (ReportError: no views "
        f"folder); build it with: samtune report noisy-digits --tracking-uri {plan.tracking_uri} "
        f"--out {plan.report_dir}"
    )


def test_no_report_is_drawn_while_records_wait_in_the_spool(monkeypatch, tmp_path, capsys):
    plan = fake_sweep(monkeypatch, tmp_path)
    plan.sweep_dir.mkdir(parents=True)
    (plan.sweep_dir / "mlflow-unlogged.jsonl").write_text("{}\n")
    monkeypatch.setattr("samtune.cli.build", lambda *a, **k: pytest.fail("report built from a partial store"))
    # Exit 3, not 0: a script must not take a sweep whose store is incomplete for done.
    assert cli.main(["sweep", DIGITS]) == cli.EXIT_INCOMPLETE == 3
    err = capsys.readouterr().err
    assert "not in MLflow yet, so no report was built" in err
    # The file lies outside the working folder: shown by its absolute path, not by ../../..
    assert f"samtune sweep {DIGITS} --resume" in err


def test_ctrl_c_after_the_sweep_started_says_how_to_resume(monkeypatch, tmp_path, capsys):
    fake_sweep(monkeypatch, tmp_path, outcome=KeyboardInterrupt())
    assert cli.main(["sweep", DIGITS]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"samtune: interrupted; finish the sweep with: samtune sweep {DIGITS} --resume"


def test_the_resume_command_it_prints_resumes_the_sweep_as_it_was_started(tmp_path):
    """A sweep started with --set, --trials, --data-root and --storage-path can only be resumed
    with them again: the printed command must carry them, pasteable as it stands."""
    import shlex

    from samtune.sweep.driver import prepare
    from samtune.sweep.errors import SweepError
    from samtune.sweep.recording import write_state

    (tmp_path / "data").mkdir()
    (tmp_path / "sub").mkdir()
    space = tmp_path / "sub" / "my space.py"  # a space in the name: the command quotes it
    space.write_text(Path(DIGITS).read_text())
    argv = [
        "sweep",
        "sub/my space.py",
        "--set",
        "epochs=2",
        "--set",
        "label_noise_rates=0.0,0.4",
        "--trials",
        "3",
        "--data-root",
        "data",
        "--storage-path",
        str(tmp_path / "runs"),
    ]

    def plan_of(words, resume=False):
        args = cli.build_parser().parse_args(words)
        return prepare(
            args.file,
            args.sets,
            trials=args.trials,
            data_root=args.data_root,
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
            storage_path=args.storage_path,
            resume=resume,
        )

    started = plan_of(argv)
    write_state(started)
    started.lock.release()  # that driver has ended: the next one may hold the sweep
    command = shlex.split(started.resume_command)
    assert command[:2] == ["samtune", "sweep"] and command[-1] == "--resume"
    assert command[2] == "sub/my space.py"
    resumed = plan_of(command[1:-1], resume=True)
    resumed.lock.release()
    assert resumed.sweep == started.sweep and resumed.sweep_dir == started.sweep_dir
    assert resumed.sweep.trials == 3 and resumed.sweep.epochs == 2
    assert resumed.resume_command == started.resume_command
    # Without the flags the sweep is another one, and --resume says so.
    with pytest.raises(SweepError, match="the sweep changed since it started"):
        plan_of(["sweep", "sub/my space.py", "--storage-path", str(tmp_path / "runs")], resume=True)


def test_report_builds_the_named_sweep_from_the_store_the_sweep_wrote(monkeypatch, tmp_path, capsys):
    calls = []

    def build(experiment, tracking_uri=None, out=None, **kwargs):
        calls.append((experiment, tracking_uri, out))
        return tmp_path / "out" / "index.html"

    monkeypatch.setattr("samtune.cli.build", build)
    # A store to read (a missing one is refused), and a server taken as answering.
    (tmp_path / "mlflow.db").touch()
    monkeypatch.setattr("samtune.sweep.store.check_reachable", lambda uri: None)
    assert cli.main(["report", "noisy-digits"]) == 0
    assert cli.main(["report", "noisy-digits", "--tracking-uri", "http://127.0.0.1:5000", "--out", "maps"]) == 0
    # Default: MLflow's local SQLite store in this folder, as an absolute path (what `sweep` uses).
    assert calls == [
        ("noisy-digits", f"sqlite:///{tmp_path}/mlflow.db", None),
        ("noisy-digits", "http://127.0.0.1:5000", "maps"),
    ]
    assert f"report written to {tmp_path}/out/index.html" in capsys.readouterr().out


def test_ui_serves_the_default_store_on_localhost_only(monkeypatch, tmp_path):
    launched = []
    monkeypatch.setattr("samtune.cli.serve", lambda cmd: launched.append(cmd) or 0)
    assert cli.main(["ui"]) == 2  # no store here yet: nothing to show
    assert launched == []
    (tmp_path / "mlflow.db").touch()
    assert cli.main(["ui", "--port", "5123"]) == 0
    (cmd,) = launched
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    options = dict(zip(cmd[4::2], cmd[5::2]))
    assert options == {
        "--backend-store-uri": f"sqlite:///{tmp_path}/mlflow.db",
        "--host": "127.0.0.1",
        "--port": "5123",
        "--workers": "1",
    }


@pytest.mark.slow
def test_sigterm_to_ui_stops_the_mlflow_server_and_its_workers(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time

    (tmp_path / "mlflow.db").touch()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen(
        [sys.executable, "-m", "samtune.cli", "ui", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:  # until the server answers
            assert ui.poll() is None and time.time() < deadline, ui.stdout.read()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        server_group = os.getpgid(int(subprocess.check_output(["pgrep", "-P", str(ui.pid)]).split()[0]))
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if ui.poll() is None:
            ui.kill()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    # Every process of the server's group has ended (killed ones may take a moment to be
    # reaped; a zombie no longer runs or listens).
    deadline = time.time() + 30
    while True:
        ps = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(server_group)], capture_output=True, text=True)
        alive = [line for line in ps.stdout.splitlines() if not line.split()[1].startswith("Z")]
        if not alive or time.time() > deadline:
            break
        time.sleep(0.5)
    assert alive == [], alive


def test_an_mlflow_environment_variable_is_the_store_for_every_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setattr("samtune.sweep.store.check_reachable", lambda uri: None)
    calls = []
    monkeypatch.setattr(
        "samtune.cli.build", lambda e, tracking_uri=None, out=None, **_: calls.append(tracking_uri) or tmp_path
    )
    assert cli.main(["report", "x"]) == 0 and calls == ["http://127.0.0.1:5999"]
    assert not os.path.exists(tmp_path / "mlflow.db")

"""`samtune studies`: optuna-dashboard over a sweep's Optuna studies, found as the sweep finds its
storage, against the real servers: optuna-dashboard itself, started by the command on 127.0.0.1,
and for a journal in a bucket moto's S3 server (`object_store.s3_server`). The studies are written
by the sweep's own code: `prepare` chooses the storage, `write_state` saves it in sweep.json (the
mirror sends that to the bucket), `open_storage` writes the cells' studies; the dashboard's
answers are checked against what was written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from object_store import SECRET_KEY, free_port, get_json, stop, wait_for_dashboard
from optuna.trial import TrialState

from samtune.cli import main
from samtune.sweep.bucket_journal import BucketJournal, journal_at, watch_journal
from samtune.sweep.driver import prepare
from samtune.sweep.errors import SweepError
from samtune.sweep.optuna_storage import open_storage
from samtune.sweep.recording import write_state
from samtune.sweep.studies_dashboard import find_studies

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "noisy_digits.py"
CELLS = ("name=t", "label_noise_rates=0.0,0.4")
NAMES = ["t/cell-0_noise-0", "t/cell-1_noise-0.4"]


def started_sweep(storage_path: str, tmp_path: Path, **extra):
    """A sweep as its driver leaves it once it has started: its storage chosen by `prepare` and
    saved in sweep.json (in a bucket too), its driver's hold released. Returns its plan."""
    plan = prepare(
        str(SPACE), list(CELLS), storage_path=storage_path, tracking_uri=f"sqlite:///{tmp_path}/m.db", **extra
    )
    try:
        write_state(plan)
        if plan.mirror is not None:
            plan.mirror.push()
    finally:
        plan.lock.release()
    return plan


def run_trials(storage, outcomes):
    """Trials in each cell's study as the searcher tells them: a value per epoch, then COMPLETE
    with the last, or PRUNED (stopped by ASHA). Returns, per study, each trial's state and values."""
    told = {}
    for name in NAMES:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
        for values, state in outcomes:
            trial = study.ask()
            trial.suggest_float("lr", 1e-3, 1.0, log=True)
            for epoch, value in enumerate(values, start=1):
                trial.report(value, epoch)
            study.tell(trial, values[-1] if state == TrialState.COMPLETE else None, state=state)
        told[name] = [(t.state.name.capitalize(), t.intermediate_values) for t in study.trials]
    return told


FIRST = [([0.5, 0.3], TrialState.COMPLETE), ([0.9], TrialState.PRUNED), ([0.4, 0.2], TrialState.COMPLETE)]
MORE = [([0.8], TrialState.PRUNED), ([0.35, 0.25], TrialState.COMPLETE)]


@contextmanager
def studies_command(*args, cwd: Path):
    """`samtune studies ARGS` serving on a free port of 127.0.0.1: its address and the lines it
    printed before serving; stopped by PID at the end, when its whole output must hold no secret."""
    port = free_port()
    out, err = cwd / f"studies-{port}.out", cwd / f"studies-{port}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "samtune.cli", "studies", *args, "--port", str(port)],
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=stdout,
            stderr=stderr,
        )
    try:
        address = f"http://127.0.0.1:{port}"
        wait_for_dashboard(address, proc, lambda: err.read_text()[-2000:], timeout=120)
        yield address, out.read_text().splitlines()
    finally:
        stop(proc)
    assert SECRET_KEY not in out.read_text() + err.read_text()


def served(address):
    """Each study the dashboard serves: its trials' states and values per epoch, as it gives them."""
    seen = {}
    for summary in get_json(f"{address}/api/studies")["study_summaries"]:
        assert summary["directions"] == ["minimize"]
        detail = get_json(f"{address}/api/studies/{summary['study_id']}")
        seen[summary["study_name"]] = [
            (t["state"], {v["step"]: v["value"] for v in t["intermediate_values"]}) for t in detail["trials"]
        ]
    return seen


def served_once_equal(address, expected, timeout_s=60.0):
    """What the dashboard serves once it equals `expected` (it re-reads its storage every few
    seconds), or when the time is up."""
    deadline = time.monotonic() + timeout_s
    while (seen := served(address)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    return seen


def check_printed(lines, address, storage):
    """The address and storage first, then each of the sweep's studies with the address of its page."""
    assert lines[0] == f"optuna-dashboard on {address}/  (Optuna storage {storage}; Ctrl-C stops it)"
    pages = dict(line.split(": ", 1) for line in lines[1:])
    assert list(pages) == NAMES
    assert all(page.startswith(f"{address}/dashboard/studies/") for page in pages.values())


# ------------------------------------------------------------------------------ served


@pytest.mark.slow
def test_a_sweeps_journal_in_a_bucket_is_served_and_shows_trials_written_after_it_started(
    s3_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("SAMTUNE_STAGING", str(tmp_path / "staging"))
    storage_path = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}"  # this process's journal objects are its own
    plan = started_sweep(storage_path, tmp_path)
    assert plan.optuna_storage == f"{storage_path}/t/optuna-journal"
    writer = open_storage(plan.optuna_storage)  # the sweep's driver, still running
    told = run_trials(writer, FIRST)
    assert [state for state, _ in told[NAMES[0]]] == ["Complete", "Pruned", "Complete"]
    with studies_command("t", "--storage-path", storage_path, cwd=tmp_path) as (address, printed):
        check_printed(printed, address, plan.optuna_storage)
        assert served(address) == told
        told = run_trials(writer, MORE)
        assert [len(trials) for trials in told.values()] == [5, 5]
        assert served_once_equal(address, told) == told
    # The dashboard wrote nothing there: the bucket's journal is the driver's, entry for entry.
    assert list(BucketJournal(plan.optuna_storage).read_logs(0)) == list(journal_at(plan.optuna_storage).read_logs(0))


@pytest.mark.slow
def test_the_default_journal_file_in_the_sweeps_folder_is_served(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = started_sweep("runs", tmp_path)
    assert plan.optuna_storage == str(tmp_path / "runs" / "t" / "optuna-journal.log")
    writer = open_storage(plan.optuna_storage)
    told = run_trials(writer, FIRST)
    with studies_command("t", "--storage-path", "runs", cwd=tmp_path) as (address, printed):
        check_printed(printed, address, plan.optuna_storage)
        assert served(address) == told
        told = run_trials(writer, MORE)
        assert served_once_equal(address, told) == told


# ------------------------------------------------------------------------------ found


def test_the_storage_a_sweep_saved_is_found_from_its_storage_path_and_nothing_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = started_sweep("runs", tmp_path, optuna_storage="sqlite:///studies.db")
    run_trials(open_storage(plan.optuna_storage), FIRST[:1])
    found = find_studies("t", "runs")
    assert found.where == f"sqlite:///{tmp_path}/studies.db" and list(found.ids) == NAMES
    assert [len(found.storage.get_all_trials(i)) for i in found.ids.values()] == [1, 1]
    # A storage named outright needs no sweep folder; one that does not exist is not made.
    assert list(find_studies("t", "elsewhere", optuna_storage="sqlite:///studies.db").ids) == NAMES
    with pytest.raises(SweepError, match="holds no study of sweep 't'"):
        find_studies("t", optuna_storage="sqlite:///missing.db")
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "elsewhere").exists()


def test_a_watching_reader_sees_new_entries_and_refuses_to_write(s3_server):
    from optuna.storages.journal import JournalStorage

    uri = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}/t/optuna-journal"
    writer = JournalStorage(journal_at(uri))
    reader = JournalStorage(watch_journal(uri, every_s=0))  # looks at every read
    study = optuna.create_study(study_name=NAMES[0], storage=writer)
    study.optimize(lambda trial: trial.suggest_float("lr", 0.0, 1.0), n_trials=2)
    assert len(optuna.load_study(study_name=NAMES[0], storage=reader).trials) == 2
    study.optimize(lambda trial: trial.suggest_float("lr", 0.0, 1.0), n_trials=3)
    again = optuna.load_study(study_name=NAMES[0], storage=reader)
    assert [(t.params, t.value) for t in again.trials] == [(t.params, t.value) for t in study.trials]
    keys = s3_server.keys()
    with pytest.raises(PermissionError, match="open for reading: only its sweep writes it"):
        optuna.create_study(study_name=NAMES[1], storage=reader)
    assert s3_server.keys() == keys
    # The driver's own journal does not look again: what it holds is the journal.
    assert journal_at(uri).watch_every_s is None


# ------------------------------------------------------------------------------ refused


def refused(argv, capsys):
    """The one line `samtune studies ARGV` is refused with (exit 2, nothing served or printed)."""
    assert main(["studies", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.strip().splitlines()
    return line


def test_a_missing_bucket_is_refused_in_one_line_before_anything_is_read_or_written(s3_server, tmp_path, capsys):
    line = refused(["t", "--storage-path", "s3://nope/runs", "--port", str(free_port())], capsys)
    assert line == "samtune: error: --storage-path s3://nope/runs: cannot read there: there is no bucket 'nope'"
    line = refused(["t", "--optuna-storage", "s3://nope/runs/t/optuna-journal"], capsys)
    assert line.endswith(": cannot read there: there is no bucket 'nope'")
    assert s3_server.keys() == [] and SECRET_KEY not in line


def test_a_storage_path_without_the_sweep_is_refused_in_one_line_and_nothing_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    journal = tmp_path / "runs" / "t" / "optuna-journal.log"
    assert refused(["t", "--storage-path", "runs"], capsys) == (
        f"samtune: error: no sweep 't' in runs: no sweep.json there, and no study of it in {journal}; "
        "give the --storage-path it ran with (and its --optuna-storage, if it had one)"
    )
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message", "secret"),
    [
        (
            ["--storage-path", "s3://sweeps/x?secret_key=s3cret-value"],
            "--storage-path s3://sweeps/x?...: the URI carries credentials (secret_key);",
            "s3cret-value",
        ),
        (
            ["--optuna-storage", "s3://user:s3cret-value@sweeps/x/t/optuna-journal"],
            "--optuna-storage s3://user:***@sweeps/x/t/optuna-journal: the URI carries credentials (a password);",
            "s3cret-value",
        ),
        (
            ["--optuna-storage", "postgresql://user:s3cret-value@127.0.0.1:9/studies"],
            "--optuna-storage postgresql://user:***@127.0.0.1:9/studies cannot be opened by Optuna (",
            "s3cret-value",
        ),
    ],
)
def test_credentials_in_a_uri_are_refused_or_masked_in_one_line(tmp_path, monkeypatch, capsys, argv, message, secret):
    monkeypatch.chdir(tmp_path)
    line = refused(["t", *argv], capsys)
    assert line.startswith(f"samtune: error: {message}") and secret not in line


def test_a_storage_without_the_sweeps_studies_names_the_sweeps_it_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/studies.db"
    optuna.create_study(study_name="other/cell-0_noise-0", storage=url)
    assert refused(["t", "--optuna-storage", url], capsys) == (
        f"samtune: error: --optuna-storage {url} holds no study of sweep 't' (it holds those of 'other')"
    )


def test_a_sweep_started_before_optuna_storages_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "sweep.json").write_text(json.dumps({"sweep": {"name": "t"}}))
    assert refused(["t", "--storage-path", "runs"], capsys) == (
        "samtune: error: sweep 't' in runs started before Optuna storages: its studies are only in its saved "
        "searcher (samtune.sweep.load_study opens them in Python)"
    )


def test_a_port_in_use_is_refused_in_one_line_before_serving(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/studies.db"
    optuna.create_study(study_name=NAMES[0], storage=url)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = refused(["t", "--optuna-storage", url, "--port", str(port)], capsys)
    assert line.startswith(f"samtune: error: --port {port}: 127.0.0.1:{port} cannot be listened on")


def test_the_command_exits_with_status_2_and_one_line_when_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "samtune.cli", "studies", "t", "--storage-path", str(tmp_path / "runs")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"samtune: error: no sweep 't' in {tmp_path / 'runs'}: no sweep.json there")


def test_a_new_sweep_is_refused_a_bucket_journal_that_holds_a_study_of_its_name(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMTUNE_STAGING", str(tmp_path / "staging"))
    journal = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}/shared-journal"
    optuna.create_study(study_name=NAMES[0], storage=open_storage(journal))
    with pytest.raises(SweepError, match=f"--optuna-storage {journal} already holds study '{NAMES[0]}'"):
        started_sweep(f"s3://{s3_server.bucket}/runs", tmp_path, optuna_storage=journal)

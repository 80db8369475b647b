"""Each cell's Optuna study in an Optuna storage: bad storages are refused before anything runs, a
saved searcher loads its study back from the storage and agrees with what the storage saw, and
(slow, end to end) what a sweep writes there is its Tune and MLflow trials, in a journal file by
default or in a database given by URL, which optuna-dashboard serves."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from object_store import free_port, get_json, stop, wait_for_dashboard
from optuna.trial import TrialState

from samtune.sweep.baselines import baseline_trials
from samtune.sweep.check import check_space
from samtune.sweep.driver import prepare
from samtune.sweep.errors import SweepError
from samtune.sweep.optuna_storage import open_storage
from samtune.sweep.recording import write_state
from samtune.sweep.search import AshaAwareOptunaSearch, CellSearch
from samtune.sweep.space_file import load_space
from samtune.sweep.study import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "noisy_digits.py"


# ------------------------------------------------------------------------------ fast


def where(tmp_path, **extra):
    return dict(storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", **extra)


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        (
            "redis://user:s3cret@127.0.0.1:6379/0",
            "--optuna-storage redis://user:***@127.0.0.1:6379/0: unknown URL scheme",
        ),
        ("mysql://user:s3cret@127.0.0.1/db", "--optuna-storage mysql://user:***@127.0.0.1/db: its database driver"),
        ("a-file/optuna.log", "cannot write a journal file in"),
        (".", "a folder; give the path of a journal file"),
    ],
)
def test_a_storage_that_cannot_hold_the_studies_is_refused_in_one_line_without_its_password(
    tmp_path, monkeypatch, storage, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("a file, not a folder")
    with pytest.raises(SweepError) as refused:
        prepare(str(SPACE), ["name=t"], **where(tmp_path, optuna_storage=storage))
    text = str(refused.value)
    assert message in text and "\n" not in text and "s3cret" not in text
    # Refused before the sweep made anything.
    assert not (tmp_path / "runs" / "t").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_new_sweep_is_refused_a_storage_that_holds_a_study_of_its_name(tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    optuna.create_study(study_name="t/cell-0_noise-0", storage=url)
    optuna.create_study(study_name="other/cell-0_noise-0", storage=url)
    with pytest.raises(SweepError) as refused:
        prepare(str(SPACE), ["name=t"], **where(tmp_path, optuna_storage=url))
    assert str(refused.value) == (
        f"--optuna-storage {url} already holds study 't/cell-0_noise-0' of a sweep named 't'; finish that sweep "
        "with --resume, or start another with --set name=... or another --optuna-storage"
    )
    # Another name is another sweep: its studies have names of their own.
    prepare(str(SPACE), ["name=u"], **where(tmp_path, optuna_storage=url)).lock.release()


def test_the_storage_defaults_to_a_journal_in_the_sweeps_folder_and_resume_keeps_the_one_it_started_with(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    plan = prepare(str(SPACE), ["name=t"], **where(tmp_path))
    assert plan.optuna_storage == str(tmp_path / "runs" / "t" / "optuna-journal.log")
    assert not Path(plan.optuna_storage).exists()  # made when the sweep starts, not by prepare
    plan.lock.release()
    # A relative SQLite path is kept absolute, so a resume from another folder finds it.
    plan = prepare(str(SPACE), ["name=s"], **where(tmp_path, optuna_storage="sqlite:///studies.db"))
    assert plan.optuna_storage == f"sqlite:///{tmp_path}/studies.db"
    write_state(plan)
    plan.lock.release()
    assert json.loads((plan.sweep_dir / "sweep.json").read_text())["optuna_storage"] == plan.optuna_storage
    resumed = prepare(str(SPACE), ["name=s"], **where(tmp_path), resume=True)
    assert resumed.optuna_storage == plan.optuna_storage
    resumed.lock.release()
    with pytest.raises(SweepError, match=r"this sweep's studies are in sqlite:///.*/studies\.db; resume it with"):
        prepare(str(SPACE), ["name=s"], **where(tmp_path, optuna_storage="other.log"), resume=True)


def lr_space(trial):  # at module level: a saved searcher pickles its space
    trial.suggest_float("lr", 0.01, 0.5, log=True)


def cell_search(storage=""):
    searchers = [
        AshaAwareOptunaSearch(
            space=lr_space,
            metric="val_error",
            mode="min",
            epochs=2,
            sampler=optuna.samplers.TPESampler(seed=cell, n_startup_trials=2),
            storage_url=storage,
            study_name=f"s/cell-{cell}" if storage else None,
        )
        for cell in range(2)
    ]
    return CellSearch(searchers, trials=4, metric="val_error", mode="min", baselines=1, names=["sgd"])


def end(search, trial_id, config, epochs=2):
    """Trial `trial_id` reports `epochs` epochs of a value its config alone decides, then ends."""
    result = {}
    for epoch in range(1, epochs + 1):
        result = {"val_error": config["lr"] / epoch, "epoch": epoch, "training_iteration": epoch, "diverged": 0}
        search.on_trial_result(trial_id, result)
    search.on_trial_complete(trial_id, result)


def test_a_saved_searcher_loads_its_studies_from_the_storage_and_suggests_as_one_kept_in_memory(tmp_path):
    storage = str(tmp_path / "optuna-journal.log")
    stored, in_memory = cell_search(storage), cell_search()
    for search in (stored, in_memory):
        configs = {f"t{n}": search.suggest(f"t{n}") for n in range(6)}  # t0-t3: cell 0, t4, t5: cell 1
        for n in (0, 1, 2, 4):
            end(search, f"t{n}", configs[f"t{n}"])
    stored.save(str(tmp_path / "searcher.pkl"))
    # What is saved of a study in a storage: which of its trials each Tune trial is, no study.
    state = stored.searchers[0].__getstate__()
    assert state["_ot_study"] is None and state["_storage"] is None
    assert state["_ot_trials"] == {"t0": 0, "t1": 1, "t2": 2, "t3": 3}
    # After the save the storage sees t3 end and t6 start; then the driver is killed.
    t3 = stored.searchers[0].study.trials[3].params
    end(stored, "t3", t3)
    stored.suggest("t6")

    restored = cell_search(storage)
    restored.restore(str(tmp_path / "searcher.pkl"))
    first, second = (s.study for s in restored.searchers)
    # t3 ended in the storage after the save: Tune runs it again, and its end there stands.
    assert first.trials[3].state == TrialState.COMPLETE
    end(restored, "t3", t3)
    end(in_memory, "t3", t3)
    # The trial Tune never saved is FAIL: Tune starts another in its place.
    assert [(t.number, t.state) for t in second.trials if "samtune.lost" in t.user_attrs] == [(2, TrialState.FAIL)]
    end(restored, "t5", second.trials[1].params)
    end(in_memory, "t5", in_memory.searchers[1].study.trials[1].params)
    # TPE learns nothing from a FAIL trial: the restored search suggests what the one that never
    # left memory does.
    for n in (6, 7):
        a, b = restored.suggest(f"t{n}"), in_memory.suggest(f"t{n}")
        assert a == b
        end(restored, f"t{n}", a)
        end(in_memory, f"t{n}", b)
    for cell in range(2):
        kept = [t for t in restored.searchers[cell].study.trials if "samtune.lost" not in t.user_attrs]
        memory = in_memory.searchers[cell].study.trials
        assert [(t.params, t.state, t.intermediate_values) for t in kept] == [
            (t.params, t.state, t.intermediate_values) for t in memory
        ]
        assert [t.user_attrs.get("samtune.baseline") for t in kept] == ["sgd", None, None, None]
        assert [t.user_attrs["samtune.trial_number"] for t in kept] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ end to end (slow)


def env():
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("RAY_ADDRESS", None)  # a sweep without --address must start its own Ray
    return e


def sweep(folder, space, *sets, optuna_storage=None):
    """`samtune sweep` of `space` to the end (exit 0) in `folder`, the search alone."""
    cmd = [sys.executable, "-m", "samtune.cli", "sweep", str(space), "--set", "name=t", "--set", "confirm_seeds=0"]
    for value in sets:
        cmd += ["--set", value]
    cmd += ["--storage-path", str(folder / "runs"), "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--no-report"]
    if optuna_storage:
        cmd += ["--optuna-storage", optuna_storage]
    proc = subprocess.run(cmd, cwd=folder, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def mlflow_trials(folder):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    (experiment,) = [client.get_experiment_by_name("t")]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("samtune.role") == "trial"]


OPTUNA_STATE = {"finished": TrialState.COMPLETE, "diverged": TrialState.COMPLETE, "stopped": TrialState.PRUNED}


def check_studies(folder, storage, cells, baselines):
    """Each cell's study holds its MLflow trials: the same count, settings, state and value per
    epoch, each tied to its Tune trial, the baselines named. Returns the trials' states."""
    client, runs = mlflow_trials(folder)
    states = Counter()
    for label, slug in cells:
        study = optuna.load_study(study_name=f"t/{slug}", storage=open_storage(storage))
        assert study.user_attrs["samtune.cell"] == label and study.user_attrs["samtune.metric"] == "val_error"
        assert study.user_attrs["samtune.direction"] == "minimize" == study.direction.name.lower()
        assert (
            study.user_attrs["samtune.sweep_id"] == json.loads((folder / "runs/t/sweep.json").read_text())["sweep_id"]
        )
        by_id = {
            r.data.tags["samtune.trial_key"].rsplit("/", 1)[1]: r for r in runs if r.data.tags["samtune.cell"] == label
        }
        assert len(study.trials) == len(by_id) > 0
        for trial in study.trials:
            run = by_id[trial.user_attrs["samtune.tune_trial_id"]]
            assert trial.user_attrs["samtune.trial_number"] == int(run.data.params["trial_number"])
            assert {k: str(v) for k, v in trial.params.items()} == {k: run.data.params[k] for k in trial.params}
            logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_error")}
            assert trial.intermediate_values == logged
            assert trial.state == OPTUNA_STATE[run.data.tags["samtune.status"]]
            assert trial.value == logged[max(logged)]
            is_baseline = run.data.params["baseline"] == "True"
            assert trial.user_attrs.get("samtune.baseline") == (baselines[trial.number] if is_baseline else None)
            states[trial.state] += 1
    return states


def declared_baselines(space, *sets):
    sweep, fn = load_space(str(space))
    sweep = apply_overrides(sweep, list(sets))
    return [b.name for b in baseline_trials(sweep, fn, check_space(sweep, fn, with_constants=True))]


SMALL = ("model=mlp", "batch_size=128", "epochs=2", "trials=3", "label_noise_rates=0.0,0.4")


@pytest.fixture(scope="module")
def journal_sweep(tmp_path_factory):
    """A small sweep of noisy_digits.py, its studies in the default journal file."""
    folder = tmp_path_factory.mktemp("journal")
    sweep(folder, SPACE, *SMALL)
    return folder


@pytest.mark.slow
def test_the_default_journal_holds_each_cells_study_of_its_trials(journal_sweep):
    storage = journal_sweep / "runs" / "t" / "optuna-journal.log"
    names = declared_baselines(SPACE, *SMALL)
    assert len(names) == 2  # noisy_digits.py declares an SGD and a SAM baseline
    states = check_studies(
        journal_sweep, str(storage), [("noise=0", "cell-0_noise-0"), ("noise=0.4", "cell-1_noise-0.4")], names
    )
    assert sum(states.values()) == 6


ASHA_SPACE = """\
from samtune.sweep import Sweep
def space(trial):
    trial.suggest_categorical('optimizer', ['sgd'])
    return {'lr': 0.2 if trial.number % 2 == 0 else 1e-6}
SWEEP = Sweep(name='t', dataset='digits', model='mlp', epochs=2, batch_size=128, trials=4,
              label_noise_rates=(0.0, 0.4), grace_period=1, reduction_factor=2, max_concurrent=1,
              search_batch=1, fixed={'sharpness_measures': ''})
"""


@pytest.mark.slow
def test_a_database_url_holds_the_studies_with_asha_stops_pruned(tmp_path):
    # One trial at a time, alternating a working and a hopeless learning rate: each hopeless
    # trial reaches the first rung behind a working one, and ASHA stops it there.
    space = tmp_path / "asha.py"
    space.write_text(ASHA_SPACE)
    url = f"sqlite:///{tmp_path}/studies.db"
    sweep(tmp_path, space, optuna_storage=url)
    assert not (tmp_path / "runs" / "t" / "optuna-journal.log").exists()
    states = check_studies(
        tmp_path, url, [("noise=0", "cell-0_noise-0"), ("noise=0.4", "cell-1_noise-0.4")], declared_baselines(space)
    )
    assert states == {TrialState.COMPLETE: 4, TrialState.PRUNED: 4}
    assert json.loads((tmp_path / "runs" / "t" / "sweep.json").read_text())["optuna_storage"] == url


@pytest.fixture
def dashboard(journal_sweep):
    """optuna-dashboard on 127.0.0.1 over the journal sweep's storage: its address."""
    port = free_port()
    binary = Path(sys.executable).with_name("optuna-dashboard")
    storage = journal_sweep / "runs" / "t" / "optuna-journal.log"
    proc = subprocess.Popen(
        [str(binary), str(storage), "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        address = f"http://127.0.0.1:{port}"
        wait_for_dashboard(address, proc, lambda: repr(proc.stderr.read()[-2000:]))
        yield address
    finally:
        stop(proc)


@pytest.mark.slow
def test_optuna_dashboard_serves_the_cells_studies(journal_sweep, dashboard):
    studies = {s["study_name"]: s for s in get_json(f"{dashboard}/api/studies")["study_summaries"]}
    assert set(studies) == {"t/cell-0_noise-0", "t/cell-1_noise-0.4"}
    client, runs = mlflow_trials(journal_sweep)
    for name, summary in studies.items():
        assert summary["directions"] == ["minimize"]
        detail = get_json(f"{dashboard}/api/studies/{summary['study_id']}")
        attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
        cell = attrs["samtune.cell"]
        assert name.endswith("_" + cell.replace("=", "-"))
        mine = {
            r.data.tags["samtune.trial_key"].rsplit("/", 1)[1]: r for r in runs if r.data.tags["samtune.cell"] == cell
        }
        assert len(detail["trials"]) == len(mine) == 3
        assert detail["has_intermediate_values"]
        for trial in detail["trials"]:
            trial_attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
            run = mine[trial_attrs["samtune.tune_trial_id"]]
            assert trial["state"] == OPTUNA_STATE[run.data.tags["samtune.status"]].name.capitalize()
            logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_error")}
            assert {v["step"]: v["value"] for v in trial["intermediate_values"]} == logged
            assert ("samtune.baseline" in trial_attrs) == (run.data.params["baseline"] == "True")


def test_a_bucket_journal_uri_with_credentials_is_refused_before_it_is_opened_or_saved():
    from samtune.sweep.errors import SweepError
    from samtune.sweep.optuna_storage import check_optuna_storage

    with pytest.raises(SweepError, match=r"^--optuna-storage .*carries credentials \(secret_key\)") as caught:
        check_optuna_storage("s3://sweeps/t/optuna-journal?secret_key=hunter2", "t", resume=False)
    assert "hunter2" not in str(caught.value)

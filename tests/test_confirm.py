"""The confirmation stage inside a real sweep: two cells on a local Ray, interrupted mid-stage and
resumed; every configuration runs on every seed exactly once, and the verdict reaches MLflow."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from test_sweep import env, epochs_logged, runs_of

SPACE = """\
from samtune.sweep import Sweep

def space(trial):
    optimizer = trial.suggest_categorical('optimizer', ['sgd', 'sam'])
    trial.suggest_float('lr', 0.01, 0.5, log=True)
    if optimizer == 'sam':
        trial.suggest_float('rho', 0.01, 0.5, log=True)
        trial.suggest_categorical('m', [16, None])

SWEEP = Sweep(name='t', dataset='digits', model='cnn', epochs=6, batch_size=64, trials=2,
              label_noise_rates=(0.0, 0.4), confirm_seeds=2, m_ablation=(None, 16),
              baselines=({'optimizer': 'sgd'}, {'optimizer': 'sam', 'rho': 0.07}),
              fixed={'sharpness_measures': ''})
"""


def sweep_cmd(tmp_path, *extra):
    return [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(tmp_path / "space.py"),
        "--no-report",
        "--storage-path",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        *extra,
    ]


def ended_reruns(tmp_path) -> int:
    if not (tmp_path / "runs" / "t" / "sweep.json").exists():
        return 0
    try:
        _, by_role = runs_of(tmp_path)
    except Exception:  # noqa: BLE001  the store is still being created: look again
        return 0
    return sum(
        r.data.tags.get("samtune.status") == "finished"
        for role in ("confirm", "ablation")
        for r in by_role.get(role, [])
    )


@pytest.mark.slow
def test_confirmation_runs_every_pick_on_every_seed_once_across_an_interrupt(tmp_path):
    (tmp_path / "space.py").write_text(SPACE)
    proc = subprocess.Popen(
        sweep_cmd(tmp_path),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while ended_reruns(tmp_path) < 2:
            assert proc.poll() is None, (
                f"the sweep ended before its confirmation stage was interrupted:\n{proc.stdout.read()[-3000:]}"
            )
            assert time.time() < deadline, "no confirmation run ended in time"
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    hint = [line for line in out.splitlines() if "interrupted in the confirmation stage" in line][-1]
    resumed = subprocess.run(
        [sys.executable, "-m", "samtune.cli", *shlex.split(hint.split("with: ", 1)[1])[1:], "--no-report"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "SAM vs SGD, test error on 2 fresh seeds" in resumed.stdout, resumed.stdout[-3000:]
    # The stage said where it was, in plain lines off a terminal.
    assert re.search(
        r"^confirmation round 1: (\d+)/\1 runs ended, \d+/\d+ epochs, \w+ in, done$", resumed.stdout, flags=re.M
    ), resumed.stdout[-3000:]

    client, by_role = runs_of(tmp_path)
    reruns = by_role["confirm"] + by_role["ablation"]
    # Two trials a cell: its baselines, which are also its best SGD and SAM configurations; so the
    # SAM baseline and the ablation's m=None are the best SAM runs, and only m=16 runs again.
    seen = Counter(
        (r.data.tags["samtune.cell"], r.data.tags["samtune.confirms"], r.data.tags["samtune.seed"]) for r in reruns
    )
    assert seen == {
        (cell, name, seed): 1
        for cell in ("noise=0", "noise=0.4")
        for name in ("best_sgd", "best_sam", "m=16")
        for seed in ("1", "2")
    }
    cells = {r.info.run_id: r for r in by_role["cell"]}
    for r in reruns:
        assert r.data.tags["samtune.status"] == "finished" and epochs_logged(client, r) == [1, 2, 3, 4, 5, 6]
        assert cells[r.data.tags["mlflow.parentRunId"]].data.tags["samtune.cell"] == r.data.tags["samtune.cell"]
        assert r.data.params["seed"] == r.data.tags["samtune.seed"] and r.data.params["data_seed"] == "0"
    assert {r.data.params["m"] for r in by_role["ablation"]} == {"16"}
    # The declared SAM baseline reached the trainer with its rho, its other settings at their defaults.
    baseline = [
        t for t in by_role["trial"] if t.data.params.get("baseline") == "True" and t.data.params["optimizer"] == "sam"
    ]
    assert len(baseline) == 2 and all(
        t.data.params["rho"] == "0.07" and t.data.params["lr"] == "0.05" and t.data.params["m"] == "None"
        for t in baseline
    )
    # The answer is on the sweep's run, where the MLflow UI shows it first, and the experiment says
    # it holds training runs (so the UI opens on them).
    (sweep_run,) = by_role["sweep"]
    assert "SAM vs SGD" in sweep_run.data.tags["mlflow.note.content"]
    assert (
        client.get_experiment(sweep_run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    )
    # Each cell's run names its data as an MLflow dataset input: the noise rate, and a digest of
    # the labels trained on (different per cell: each cell draws its own noise).
    digests = set()
    for run in by_role["cell"]:
        (found,) = client.get_run(run.info.run_id).inputs.dataset_inputs
        profile = json.loads(found.dataset.profile)
        assert found.dataset.name == f"digits {run.data.tags['samtune.cell']}"
        assert profile["label_noise_rate"] == float(run.data.tags["samtune.cell"].split("=")[1])
        assert (profile["flipped_labels"] > 0) == (profile["label_noise_rate"] > 0)
        digests.add(found.dataset.digest)
    assert len(digests) == 2
    local = client.download_artifacts(sweep_run.info.run_id, "verdicts.json", str(tmp_path))
    verdicts = json.loads(open(local).read())
    assert [v["cell"] for v in verdicts] == ["noise=0", "noise=0.4"]
    assert all(v["configs"]["best_sam"]["final"]["n"] == 2 for v in verdicts)
    # The runs are named so that a list reads: the sweep with its id, each trial by its cell,
    # optimizer, searched settings, role and number, each confirmation by its pick and seed.
    sweep_id = json.loads((tmp_path / "runs" / "t" / "sweep.json").read_text())["sweep_id"]
    assert sweep_run.info.run_name == f"t {sweep_id}"
    assert sorted(t.info.run_name for t in by_role["trial"]) == sorted(
        f"{cell} {name} baseline #{number}"
        for cell in ("noise=0", "noise=0.4")
        for number, name in enumerate(("SGD lr=0.05", "SAM lr=0.05 rho=0.07 m=None"))
    )
    for r in reruns:
        tags = r.data.tags
        assert r.info.run_name == f"{tags['samtune.cell']} {tags['samtune.confirms']} seed {tags['samtune.seed']}"
    # Each cell's run names its search's picks; each pick's run holds its final weights as an
    # MLflow model, which computes on a batch what its trial's last checkpoint computes.
    import mlflow.pytorch
    import torch

    from samtune.data import load_dataset, to_float
    from samtune.models import build_model

    digits = load_dataset("digits")
    batch = to_float(digits.test_x[:32], digits.mean, digits.std)
    trial_runs = {t.data.tags["samtune.trial_key"]: t for t in by_role["trial"]}
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        for cell_run in by_role["cell"]:
            picks = dict(pick.split(":", 1) for pick in cell_run.data.tags["samtune.picks"].split(","))
            assert list(picks) == ["best_sgd", "best_sam"]
            for name, trial_key in picks.items():
                run = trial_runs[trial_key]
                assert run.data.params["optimizer"] == name.removeprefix("best_")
                trial_id = trial_key.rsplit("/", 1)[1]
                last = max((tmp_path / "runs" / "t" / "trials").glob(f"*{trial_id}*/checkpoint_*"))
                trained = build_model("cnn", 10, (1, 8, 8))
                trained.load_state_dict(torch.load(last / "trial.pt", weights_only=True)["model"])
                loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
                assert torch.equal(loaded(batch), trained.eval()(batch)), (cell_run.info.run_name, name)
    finally:
        mlflow.set_tracking_uri(before)

"""The report, checked on the numbers behind each figure.

A synthetic sweep with known structure is written through `samtune.sweep.tracking.Tracker` (so the
MLflow layout is the sweep's own) into a SQLite store under a temporary folder:

- validation error minimal at rho = 0.1, depending strongly on the learning rate and barely on m;
- SGD under label noise memorizing (its validation error is lowest at epoch 2 of 3), SAM not;
- seed repeats of the best SGD configuration, for the error bars;
- sharpness measures with known Kendall tau against test error (+1, -1, and one confounded by
  the learning rate: tau 1/11 within a cell, granulated tau -1/3);
- failed, diverged and interrupted trials with tempting numbers that must be counted and never
  plotted, and one trial stopped early by ASHA.

Expected values are computed here from what was logged, by plain Python, or are closed forms.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samtune import cli
from samtune.contract.metrics import is_sharpness_setting, sharpness_params
from samtune.report.load import load_runs
from samtune.report.page import build_report, write_report
from samtune.report.runs import SHARPNESS_SHARED_KEYS, NoFinishedTrialsError, ReportError, TrialRecord
from samtune.report.table import best_per_optimizer, choice_metric, tabulate
from samtune.report.views import discover_views, render_views
from samtune.sharpness.measures import SHARED_KEYS, measure_sharpness
from samtune.sweep.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
VIEWS = ("answer", "claims", "robustness", "sensitivity", "sharpness", "memorization")

EXPERIMENT = "synthetic"
EPOCHS = 3
BATCH = 64  # m=None stands for the whole per-worker batch: 64 here
NOISE = (0.0, 0.4)
SGD_LRS = (0.03, 0.1, 0.3)
SAM_LRS = (0.03, 0.1)
RHOS = (0.02, 0.1, 0.5)
MS = (8, None)
BEST_RHO = 0.1
SEED_SPREAD = 0.01  # the best SGD config's two seeds sit this far either side of its mean
MEASURES = ("adaptive_sharpness", "hessian_trace", "m_sharpness")
# Per-epoch offsets of validation/test error over the final value: a memorizing run (SGD under
# label noise) is best at epoch 2, every other run keeps improving.
MEMORIZING = (0.10, 0.0, 0.05)
IMPROVING = (0.20, 0.10, 0.0)
# Training accuracy per epoch on the noisy and on the true labels.
ACC = {
    "memorizing": ((0.5, 0.7, 0.9), (0.7, 0.65, 0.6)),
    "resisting": ((0.5, 0.55, 0.6), (0.7, 0.8, 0.9)),
    "clean": ((0.8, 0.9, 0.95), (0.8, 0.9, 0.95)),
}


def sharpness_bookkeeping() -> dict[str, float]:
    """Everything measure_sharpness logs beside a measure's value (what it was measured on, the
    parameter filter, the settings, the norm), taken from a real call on a tiny model so that a
    key it starts logging later is logged by the synthetic sweep too."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    logged = measure_sharpness(model, F.cross_entropy, x, y, measures=["adaptive_sharpness"], params=["0"])
    del logged["sharpness/adaptive_sharpness"]  # the value itself: each trial logs its own
    return logged


SHARPNESS_BOOKKEEPING = sharpness_bookkeeping()


def cell_label(noise: float) -> str:
    return f"noise={noise:g}"


def sam_val(noise, lr, rho, m):
    # lr matters most (a 0.3 step), rho next (0.024 at rho 0.02 or 0.5, 0 at 0.1), m barely.
    return 0.05 + 0.3 * noise + 0.3 * (lr == 0.03) + 0.05 * math.log10(rho / BEST_RHO) ** 2 + 0.002 * (m is None)


def sgd_val(noise, lr):
    return 0.15 + 0.3 * noise + 0.2 * abs(math.log10(lr / 0.1))


@dataclass
class Trial:
    """What one synthetic trial logged: the reference the report is checked against."""

    key: str
    cell: str
    noise: float
    status: str
    config: dict
    val: list[float]
    test: list[float]
    acc_noisy: list[float] = field(default_factory=list)
    acc_true: list[float] = field(default_factory=list)
    sharpness: dict[str, float] = field(default_factory=dict)

    @property
    def optimizer(self) -> str:
        return self.config["optimizer"]

    @property
    def config_id(self) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in self.config.items() if k != "seed"))


def base_config(noise: float, seed: int = 0) -> dict:
    return {
        "dataset": "digits",
        "model": "cnn",
        "scenario": "label_noise",
        "label_noise_rate": noise,
        "label_noise_kind": "symmetric",
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "seed": seed,
        "data_seed": 0,
        "data_subset": None,
        "workers": 1,
        "use_gpu": False,
        "sharpness_every": 0,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "sharpness_measures": MEASURES,
    }


def synthetic_trials() -> list[Trial]:
    trials: list[Trial] = []

    def add(cell, noise, status, config, val, test, **more):
        slug = f"cell-{NOISE.index(noise)}_{cell.replace('=', '-')}"  # as the sweep names cells
        key = f"{EXPERIMENT}/{slug}/{len(trials):05d}"
        trials.append(Trial(key, cell, noise, status, config, val, test, **more))

    for noise in NOISE:
        cell = cell_label(noise)
        # (optimizer, searched values, final val error, seed, shift of this seed's errors)
        runs = [("sgd", {"lr": lr}, sgd_val(noise, lr), 0, 0.0) for lr in SGD_LRS if lr != 0.1]
        runs += [
            ("sgd", {"lr": 0.1}, sgd_val(noise, 0.1), seed, shift)
            for seed, shift in ((0, -SEED_SPREAD), (1, SEED_SPREAD))
        ]
        runs += [
            ("sam", {"lr": lr, "rho": rho, "m": m}, sam_val(noise, lr, rho, m), 0, 0.0)
            for lr in SAM_LRS
            for rho in RHOS
            for m in MS
        ]
        for optimizer, space, val, seed, shift in runs:
            memorizes = optimizer == "sgd" and noise > 0
            offsets = MEMORIZING if memorizes else IMPROVING
            # Distinct test errors (no ties in the rank correlations), far below the structure.
            test = val - 0.01 + shift + len(trials) * 1e-6
            final_val = val + shift
            acc = ACC["memorizing" if memorizes else "resisting" if noise > 0 else "clean"]
            final_test = test + offsets[-1]
            sharpness = {"m_sharpness": 2 * final_test + 1.0, "hessian_trace": -final_test}
            if optimizer == "sam":
                # Confounded by lr: within a cell tau is 1/11, controlled for lr it is -1.
                sharpness["adaptive_sharpness"] = 10.0 * (space["lr"] == 0.03) - final_test
            add(
                cell,
                noise,
                "finished",
                {**base_config(noise, seed), "optimizer": optimizer, **space},
                [final_val + o for o in offsets],
                [test + o for o in offsets],
                acc_noisy=list(acc[0]),
                acc_true=list(acc[1]),
                sharpness=sharpness,
            )
        # Tempting numbers on trials that must never be plotted.
        sam_space = {"optimizer": "sam", "lr": 0.1, "rho": 0.1, "m": 8}
        add(cell, noise, "failed", {**base_config(noise), **sam_space}, [0.001], [0.001])
        add(cell, noise, "diverged", {**base_config(noise), **sam_space, "lr": 5.0}, [0.001, 1.0], [0.001, 1.0])
        if noise == 0:
            add(cell, noise, "running", {**base_config(noise), **sam_space, "lr": 0.2}, [0.001], [0.001])
        else:
            add(
                cell,
                noise,
                "stopped",
                {**base_config(noise), **sam_space, "lr": 0.5},
                [0.6],
                [0.6],
                acc_noisy=[0.3],
                acc_true=[0.3],
            )
    return trials


# (optimizer, searched values, final test error) of a sweep trained with val_fraction=0.
NO_VALIDATION = (
    ("sgd", {"lr": 0.03}, 0.40),
    ("sgd", {"lr": 0.1}, 0.30),
    ("sam", {"lr": 0.03, "rho": 0.1, "m": 8}, 0.25),
    ("sam", {"lr": 0.1, "rho": 0.1, "m": 8}, 0.20),
)


def no_validation_trials() -> list[Trial]:
    """Finished trials that logged test error and no validation error at all."""
    noise = 0.4
    trials = []
    for i, (optimizer, space, final) in enumerate(NO_VALIDATION):
        offsets = MEMORIZING if optimizer == "sgd" else IMPROVING
        acc = ACC["memorizing" if optimizer == "sgd" else "resisting"]
        trials.append(
            Trial(
                f"no-validation/cell-0_noise-0.4/{i:05d}",
                cell_label(noise),
                noise,
                "finished",
                {**base_config(noise), "optimizer": optimizer, **space},
                [],
                [final + o for o in offsets],
                acc_noisy=list(acc[0]),
                acc_true=list(acc[1]),
            )
        )
    return trials


def write_sweep(uri: str, experiment: str, trials: list[Trial], folder: Path, sweep_key: str | None = None) -> str:
    """Write `trials` the way the sweep driver does; returns the sweep run's id. `sweep_key`
    (trial keys start with it) names a further sweep under the same experiment name. Every other
    trial with sharpness measures records their settings as an older sweep did (metric series),
    the rest as the driver does now (params): the report reads both alike."""
    from mlflow.tracking import MlflowClient

    sweep_key = sweep_key or experiment
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        # Artifacts under the test's folder, not ./mlruns of wherever pytest runs.
        client.create_experiment(experiment, artifact_location=(folder / experiment).as_uri())
    tracker = Tracker(uri, experiment, folder / f"{sweep_key}-unlogged.jsonl")
    tracker.declare(sweep_key, experiment, "sweep", **{"samtune.space_file": "/spaces/synthetic.py"})
    tracker.log_params(
        sweep_key, {"name": experiment, "epochs": EPOCHS, "label_noise_rates": sorted({t.noise for t in trials})}
    )
    cells = {}
    for index, trial in enumerate(trials):
        cell_key = trial.key.rsplit("/", 1)[0]
        if cell_key not in cells:
            cells[cell_key] = trial.cell
            tracker.declare(cell_key, trial.cell, "cell", parent=sweep_key, **{"samtune.cell": trial.cell})
            tracker.log_params(
                cell_key, {"scenario": "label_noise", "label_noise_rate": trial.noise, "label_noise_kind": "symmetric"}
            )
        tracker.declare(
            trial.key,
            f"{trial.cell} {trial.key[-5:]}",
            "trial",
            parent=cell_key,
            **{"samtune.cell": trial.cell, "samtune.trial_key": trial.key, "samtune.status": "running"},
        )
        tracker.log_params(trial.key, trial.config)
        for i, test in enumerate(trial.test):
            epoch = i + 1
            # No val list: a trial trained without a validation split (val_fraction=0).
            val = trial.val[i] if trial.val else None
            metrics = {
                "epoch": epoch,
                "test_error": test,
                "train_loss": 1.0 / epoch,
                "lr": trial.config["lr"] * (1 - i / EPOCHS),
                "diverged": int(test == 1.0),
            }
            if val is not None:
                metrics["val_error"] = val
            if trial.acc_noisy:
                # As train reports it: the gap is taken from the eval-mode training error.
                train_error = 1 - trial.acc_noisy[i]
                metrics.update(
                    train_acc_noisy=trial.acc_noisy[i],
                    train_acc_true=trial.acc_true[i],
                    train_error=train_error,
                    generalization_gap=test - train_error,
                )
            if epoch == len(trial.test) and trial.sharpness:
                # Measured at the end of training, logged with the last epoch (as train does),
                # with everything measure_sharpness logs beside the values: none is a measure.
                metrics.update({f"sharpness/{k}": v for k, v in trial.sharpness.items()})
                metrics.update(SHARPNESS_BOOKKEEPING)
                if index % 2 == 0:  # as the driver records them now: settings are params
                    tracker.log_params(trial.key, sharpness_params(metrics))
                    metrics = {k: v for k, v in metrics.items() if not is_sharpness_setting(k)}
            tracker.log_metrics(trial.key, metrics, step=epoch)
        if trial.status != "running":  # an interrupted sweep leaves its trial running
            tracker.set_status(trial.key, trial.status)
    for cell_key in cells:
        tracker.set_status(cell_key, "finished")
    tracker.set_status(sweep_key, "finished")
    assert tracker.close() is None
    return tracker.run_id(sweep_key)


# The confirmation stage's runs: (cell, pick, final test error per seed); each run's errors at the
# epoch of lowest validation error are 0.02 lower (early stopping under label noise).
# noise=0: SAM clearly lower; noise=0.4: the seeds disagree, the interval covers 0. At noise=0
# the SAM baseline is the best SAM configuration itself (run once, named twice).
CONFIRMED = {
    ("noise=0", "best_sgd"): (0.30, 0.32, 0.31),
    ("noise=0", "best_sam"): (0.20, 0.21, 0.21),
    ("noise=0.4", "best_sgd"): (0.40, 0.45, 0.38),
    ("noise=0.4", "best_sam"): (0.41, 0.39, 0.40),
    ("noise=0.4", "sam_baseline"): (0.44, 0.43, 0.45),
    ("noise=0.4", "m=8"): (0.36, 0.37, 0.35),
}


def write_confirmations(uri: str, experiment: str, folder: Path) -> None:
    """Confirmation runs under the synthetic sweep's cells, as `samtune.sweep.confirm` writes them."""
    tracker = Tracker(uri, experiment, folder / "confirm-unlogged.jsonl")
    for (cell, name), errors in CONFIRMED.items():
        noise = float(cell.split("=")[1])
        cell_key = f"{experiment}/cell-{NOISE.index(noise)}_{cell.replace('=', '-')}"
        tracker.declare(cell_key, cell, "cell", parent=experiment, **{"samtune.cell": cell})
        if noise == 0:
            tracker.set_tags(cell_key, {"samtune.aliases": "sam_baseline:best_sam"})
        for seed, final in enumerate(errors, start=1):
            key = f"{cell_key}/{name}/seed{seed}"
            tracker.declare(
                key,
                f"{cell} {name} seed {seed}",
                "ablation" if name.startswith("m=") else "confirm",
                parent=cell_key,
                **{
                    "samtune.cell": cell,
                    "samtune.confirms": name,
                    "samtune.seed": str(seed),
                    "samtune.status": "running",
                },
            )
            tracker.log_params(
                key,
                {
                    **base_config(noise, seed),
                    "optimizer": name.split("_")[-1] if name.startswith("best") else "sam",
                    "confirms": name,
                },
            )
            for epoch, (val, test) in enumerate(((0.5, final), (0.2, final - 0.02), (0.3, final)), start=1):
                tracker.log_metrics(key, {"epoch": epoch, "val_error": val, "test_error": test}, step=epoch)
            tracker.set_status(key, "finished")
    assert tracker.close() is None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlflow.db"
    trials = synthetic_trials()
    sweep_run_id = write_sweep(uri, EXPERIMENT, trials, folder)
    config = {**base_config(0.0), "optimizer": "sgd", "lr": 0.1}
    write_sweep(
        uri,
        "nothing-finished",
        [
            Trial(f"nothing-finished/cell-0_noise-0/{i:05d}", "noise=0", 0.0, status, config, [0.3], [0.3])
            for i, status in enumerate(("failed", "failed", "running"))
        ],
        folder,
    )
    write_sweep(uri, "no-validation", no_validation_trials(), folder)
    write_confirmations(uri, EXPERIMENT, folder)
    return {"uri": uri, "trials": trials, "sweep_run_id": sweep_run_id, "folder": folder}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    (out / "notes.txt").write_text("a user's file in the output folder")
    built = build_report(EXPERIMENT, tracking_uri=store["uri"], out=out, strict=True)
    return built, {r.spec.name: r.view.data for r in built.views}


def plotted(trials, cell=None, statuses=("finished", "stopped")):
    return [t for t in trials if t.status in statuses and (cell is None or t.cell == cell)]


# -- the runs table ------------------------------------------------------------------------------


def test_runs_table_reads_the_tracking_layout_back(store, report):
    runs = report[0].runs
    trials = store["trials"]
    assert runs.sweep_run_id == store["sweep_run_id"]
    table = runs.trials.set_index("trial_key")
    assert sorted(table.index) == sorted(t.key for t in trials)
    for t in trials:
        row = table.loc[t.key]
        assert (row["cell"], row["status"], row["epochs_run"]) == (t.cell, t.status, len(t.test))
        assert row["lr"] == pytest.approx(t.config["lr"])
        # "None" (m = whole batch) and keys an SGD trial never had both read back as None.
        assert row["m"] == t.config["m"] if t.config.get("m") is not None else row["m"] is None
        assert row["sharpness_measures"] == json.dumps(list(MEASURES))
    assert runs.status_counts() == {"finished": 32, "failed": 2, "diverged": 2, "running": 1, "stopped": 1}
    # Settings logged beside a measure (sharpness/<measure>/<setting>) and what it was measured
    # on (sharpness/subset, /seed, /batch, /num_params) are not measures.
    assert {f"sharpness/{k}" for k in SHARED_KEYS} <= set(SHARPNESS_BOOKKEEPING)
    assert {f"sharpness/{k}" for k in SHARED_KEYS} <= set(runs.trials.columns)
    assert runs.sharpness_measures == sorted(MEASURES)
    # Settings read back alike from params (this sweep) and from metric series (older sweeps),
    # as the measurement reported them, and no part of a trial's configuration.
    settings = {k: v for k, v in SHARPNESS_BOOKKEEPING.items() if is_sharpness_setting(k)}
    assert "sharpness/adaptive_sharpness/norm/l2" in settings and "sharpness/params/0" in settings
    measured = table.loc[[t.key for t in trials if t.sharpness]]
    assert len(measured) > 2
    for key, value in settings.items():
        assert measured[key].tolist() == [value] * len(measured), key
    assert not any(name.startswith("sharpness/") for name in runs.param_names)
    assert not set(settings) & set(runs.history.columns)


def test_the_report_knows_every_key_measure_sharpness_logs_beside_the_measures():
    # The report keeps its own copy (so it need not import torch); it must not drift.
    assert SHARPNESS_SHARED_KEYS == set(SHARED_KEYS)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    shared = measure_sharpness(model, F.cross_entropy, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), measures=[])
    assert set(shared) == {f"sharpness/{k}" for k in SHARPNESS_SHARED_KEYS}


def test_failed_diverged_and_interrupted_trials_are_counted_and_never_plotted(store, report):
    built, data = report
    excluded = {t.key for t in store["trials"] if t.status in ("failed", "diverged", "running")}
    shown = {t.key for t in plotted(store["trials"])}
    assert set(data["robustness"]["trials"]["trial_key"]) == shown
    assert set(data["sensitivity"]["slice"]["trial_key"]) == shown
    assert set(built.runs.history["trial_key"]) == shown
    # Their val/test error of 0.001 would win every cell if they were used.
    for frame in (data["robustness"]["best"], data["sensitivity"]["heatmap"]):
        assert (frame.filter(like="val_error") > 0.01).all().all()
    html = built.index.read_text()
    excluded_section = html[html.index('<section id="excluded">') :]
    assert "5 trials carry no plottable numbers" in excluded_section
    for key in excluded:
        assert key in excluded_section
    assert "32 finished" in html and "2 failed" in html and "2 diverged" in html


# -- robustness ----------------------------------------------------------------------------------


def expected_best(trials, cell, optimizer, panel):
    """(mean test error, its std over seeds or nan, config) of the config with the lowest mean
    validation error: final epoch among finished trials, or best epoch among finished+stopped."""
    statuses = ("finished",) if panel == "final" else ("finished", "stopped")
    configs = defaultdict(list)
    for t in plotted(trials, cell, statuses):
        if t.optimizer == optimizer:
            configs[t.config_id].append(t)

    def val(t):
        return t.val[-1] if panel == "final" else min(t.val)

    def test(t):
        return t.test[-1] if panel == "final" else t.test[t.val.index(min(t.val))]

    chosen = min(configs.values(), key=lambda ts: statistics.mean(val(t) for t in ts))
    tests = [test(t) for t in chosen]
    std = statistics.stdev(tests) if len(tests) > 1 else float("nan")
    return statistics.mean(tests), std, chosen[0].config


def test_robustness_is_best_sam_against_best_sgd_per_cell_final_and_best_epoch(store, report):
    _, data = report
    best = data["robustness"]["best"]
    for noise in NOISE:
        cell = cell_label(noise)
        for panel in ("final", "best"):
            rows = best[(best["cell"] == cell) & (best["epoch"] == panel)].set_index("optimizer_label")
            assert sorted(rows.index) == ["SAM", "SGD"]
            assert rows["x"].tolist() == [noise, noise]
            for label, optimizer in (("SGD", "sgd"), ("SAM", "sam")):
                mean, std, config = expected_best(store["trials"], cell, optimizer, panel)
                assert rows.loc[label, "test_error"] == pytest.approx(mean, abs=1e-9)
                assert rows.loc[label, "lr"] == pytest.approx(config["lr"])
                if label == "SGD":  # two seeds: the error bar is their sample std
                    assert rows.loc[label, "n_seeds"] == 2
                    assert rows.loc[label, "test_error_std"] == pytest.approx(std, abs=1e-9)
                    assert std == pytest.approx(SEED_SPREAD * math.sqrt(2), abs=1e-5)
                else:
                    assert (rows.loc[label, "rho"], rows.loc[label, "m"]) == (BEST_RHO, 8)
                    assert np.isnan(rows.loc[label, "test_error_std"])
    gain = data["robustness"]["gain"].set_index(["epoch", "cell"])["gain"]
    assert (gain > 0).all()
    # Under noise SGD is best at epoch 2 and 0.05 worse at the end: early stopping shrinks SAM's
    # gain by exactly that much; without noise nothing memorizes and the panels agree.
    noisy, clean = cell_label(0.4), cell_label(0.0)
    assert gain[("final", noisy)] - gain[("best", noisy)] == pytest.approx(MEMORIZING[2])
    assert gain[("final", clean)] == pytest.approx(gain[("best", clean)])


def test_a_best_epoch_choice_that_asha_stopped_is_drawn_hollow_and_named(tmp_path):
    """At high noise the best-epoch panel may pick a configuration ASHA stopped after one epoch;
    next to full-budget points it must say so, not pass for a like-for-like comparison."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    noise, cell = 0.8, cell_label(0.8)
    prefix = f"short-best/cell-0_noise-{noise}"
    sam = {"optimizer": "sam", "rho": 0.1, "m": 8}
    trials = [
        Trial(
            f"{prefix}/00000",
            cell,
            noise,
            "finished",
            {**base_config(noise), "optimizer": "sgd", "lr": 0.1},
            [0.80, 0.85, 0.90],
            [0.60, 0.65, 0.70],
        ),
        # Its one epoch validates better than any SGD epoch: the best-epoch panel chooses it.
        Trial(f"{prefix}/00001", cell, noise, "stopped", {**base_config(noise), **sam, "lr": 0.3}, [0.70], [0.50]),
        Trial(
            f"{prefix}/00002",
            cell,
            noise,
            "finished",
            {**base_config(noise), **sam, "lr": 0.03},
            [0.88, 0.86, 0.84],
            [0.66, 0.64, 0.62],
        ),
    ]
    write_sweep(uri, "short-best", trials, tmp_path)
    built = build_report("short-best", tracking_uri=uri, out=tmp_path / "out", strict=True)
    view = {r.spec.name: r.view for r in built.views}["robustness"]
    best = view.data["best"].set_index(["epoch", "optimizer_label"])
    assert best.loc[("best", "SAM"), "lr"] == 0.3 and best.loc[("best", "SAM"), "stopped_early"]
    assert best.loc[("best", "SAM"), "epochs_run"] == 1
    assert best.loc[("final", "SAM"), "lr"] == 0.03  # the final panel only weighs whole runs
    assert not best.loc[("final", "SAM"), "stopped_early"]
    assert not best.loc[("best", "SGD"), "stopped_early"]
    notes = [n for n in view.notes if "hollow" in n]
    assert len(notes) == 1 and cell in notes[0] and "SAM" in notes[0] and "1 epoch" in notes[0]


def tied_sweep(tmp_path, picks=None, reverse=False):
    """One 20%-noise cell where two SAM trials tie on final validation error; the one the search
    suggested second (trial_number 2) has a far worse test error. `reverse` writes the trials in
    the other order, so that neither the store's order nor the table's decides the tie."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    noise, cell = 0.2, cell_label(0.2)
    prefix = f"tied/cell-0_noise-{noise}"
    sam = {"optimizer": "sam", "rho": 0.1, "m": 8}
    acc = {"acc_noisy": [0.7, 0.8, 0.9], "acc_true": [0.8, 0.85, 0.8]}
    # Each SAM trial's own accuracy on the true labels, so a view's curve says whose it is.
    memorizes, resists = {**acc, "acc_true": [0.8, 0.7, 0.6]}, {**acc, "acc_true": [0.8, 0.85, 0.9]}
    trials = [
        Trial(
            f"{prefix}/00002",
            cell,
            noise,
            "finished",
            {**base_config(noise), **sam, "lr": 0.3, "trial_number": 2},
            [0.30, 0.25, 0.20],
            [0.20, 0.10, 0.039],
            **memorizes,
        ),
        Trial(
            f"{prefix}/00000",
            cell,
            noise,
            "finished",
            {**base_config(noise), **sam, "lr": 0.03, "trial_number": 0},
            [0.30, 0.22, 0.20],
            [0.10, 0.05, 0.008],
            **resists,
        ),
        Trial(
            f"{prefix}/00001",
            cell,
            noise,
            "finished",
            {**base_config(noise), "optimizer": "sgd", "lr": 0.1, "trial_number": 1},
            [0.30, 0.26, 0.24],
            [0.12, 0.06, 0.03],
            **acc,
        ),
    ]
    write_sweep(uri, "tied", trials[::-1] if reverse else trials, tmp_path)
    if picks is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        (cell_run,) = client.search_runs(
            [client.get_experiment_by_name("tied").experiment_id], filter_string="tags.`samtune.role` = 'cell'"
        )
        client.set_tag(cell_run.info.run_id, "samtune.picks", ",".join(f"{k}:{prefix}/{v}" for k, v in picks.items()))
    built = build_report("tied", tracking_uri=uri, out=tmp_path / "out", strict=True)
    return {r.spec.name: r.view for r in built.views}


@pytest.mark.parametrize("reverse", [False, True], ids=["written-in-order", "written-reversed"])
def test_a_tie_goes_to_the_trial_the_search_suggested_first_in_every_view(tmp_path, reverse):
    """The sweep confirms the earlier of two tied trials (`CellResult.best`): the robustness and
    memorization views must draw that one too, never the other."""
    views = tied_sweep(tmp_path, reverse=reverse)
    best = views["robustness"].data["best"].set_index(["epoch", "optimizer_label"])
    assert best.loc[("final", "SAM"), "lr"] == 0.03 and best.loc[("final", "SAM"), "test_error"] == 0.008
    curves = views["memorization"].data["curves"]
    sam_curve = curves[curves["optimizer_label"] == "SAM"].sort_values("epoch")
    assert list(sam_curve["train_acc_true"]) == pytest.approx([0.8, 0.85, 0.9])
    # The robustness note sets each single-run gain beside what can be concluded from it.
    notes = " ".join(views["robustness"].notes)
    assert "one seed each, no interval" in notes and "confirm_seeds=0" in notes


def test_the_views_draw_the_picks_the_sweep_recorded(tmp_path):
    """A sweep that picked by another metric than the view's (recorded on the cell run) is drawn
    as it picked: the confirmed configuration, not the view's own choice."""
    views = tied_sweep(tmp_path, picks={"best_sam": "00002", "best_sgd": "00001"})
    best = views["robustness"].data["best"].set_index(["epoch", "optimizer_label"])
    assert best.loc[("final", "SAM"), "lr"] == 0.3 and best.loc[("final", "SAM"), "test_error"] == 0.039
    # The early-stopping panel chooses by its own rule (best validation epoch), and says so.
    assert best.loc[("best", "SAM"), "lr"] == 0.03


# -- sensitivity ---------------------------------------------------------------------------------


def test_sensitivity_heatmap_has_its_minimum_at_the_known_rho(report):
    _, data = report
    heat = data["sensitivity"]["heatmap"]
    for noise in NOISE:
        group = heat[heat["cell"] == cell_label(noise)]
        # m=None is the whole per-worker batch.
        assert set(group["m_bin"]) == {"8", str(BATCH)}
        assert set(group["rho_bin"]) == {f"{r:.3g}" for r in RHOS}
        for _, square in group.iterrows():
            rho = float(square["rho_bin"])
            m = None if square["m_bin"] == str(BATCH) else int(square["m_bin"])
            # Each square's best is its lr=0.1 trial (every SAM lr is in every square).
            assert square["best_val_error"] == pytest.approx(sam_val(noise, 0.1, rho, m))
        lowest = group.loc[group["best_val_error"].idxmin()]
        assert (float(lowest["rho_bin"]), lowest["m_bin"]) == (BEST_RHO, "8")


def test_importance_puts_lr_first_and_m_last():
    spec = next(s for s in discover_views() if s.name == "sensitivity")
    importance = spec.function(tabulate("importance", importance_records())).data["importance"]
    assert set(importance["evaluator"]) == {"fANOVA", "PED-ANOVA"}
    sam = importance[importance["scope"] == "SAM family"]
    for (cell, evaluator), group in sam.groupby(["cell", "evaluator"]):
        # Only what the sweep searched among SAM trials: not the seed, not the resources.
        assert set(group["param"]) == {"lr", "rho", "m"}, (cell, evaluator)
        assert (group["n_trials"] == 24).all()
        assert group["importance"].sum() == pytest.approx(1.0)
        ranked = list(group.sort_values("importance", ascending=False)["param"])
        assert ranked[0] == "lr", (cell, evaluator, ranked)
        if evaluator == "fANOVA":  # PED-ANOVA looks at the top trials only, where rho ~ m
            assert ranked == ["lr", "rho", "m"], (cell, ranked)


def test_cells_with_fewer_than_twenty_finished_trials_draw_no_importance_and_say_why(report):
    built, data = report
    # 16 finished trials a cell (4 SGD, 12 SAM): too few to rank settings by.
    assert data["sensitivity"]["importance"].empty
    view = next(r.view for r in built.views if r.spec.name == "sensitivity")
    notes = [n for n in view.notes if "no importance panels" in n]
    assert len(notes) == len(NOISE) and all("16 trials ran their whole budget" in n for n in notes)


def importance_records(extra=()):
    """24 finished SAM trials where lr matters most, rho next and m barely (as in the
    synthetic sweep), plus `extra` (status, lr, rho, m, value) trials."""
    specs = [
        ("finished", lr, rho, m, sam_val(0.0, lr, rho, m if m == 8 else None))
        for lr in SAM_LRS
        for rho in RHOS
        for m in (8, 16, 32, 4)
    ] + list(extra)
    return [
        TrialRecord(
            run_id=f"r{i}",
            tags={"samtune.cell": "noise=0", "samtune.status": status},
            params={
                "optimizer": "sam",
                "lr": repr(lr),
                "rho": repr(rho),
                "m": str(m),
                "batch_size": "64",
                "label_noise_rate": "0.0",
                "seed": "0",
            },
            # A stopped trial's only value is that of its first epoch.
            history={
                "val_error": [(1 if status == "stopped" else EPOCHS, value)],
                "test_error": [(1 if status == "stopped" else EPOCHS, value)],
            },
        )
        for i, (status, lr, rho, m, value) in enumerate(specs)
    ]


def importance_ranking(records):
    spec = next(s for s in discover_views() if s.name == "sensitivity")
    importance = spec.function(tabulate("importance", records)).data["importance"]
    importance = importance[importance["scope"] == "SAM family"]
    return {
        evaluator: (
            list(group.sort_values("importance", ascending=False)["param"]),
            dict(zip(group["param"], group["importance"])),
        )
        for evaluator, group in importance.groupby("evaluator")
    }


def test_an_asha_stopped_trial_does_not_move_the_importance():
    # Stopped after one epoch at the bad lr and an unseen rho, with an error no finished
    # trial reaches: read as a finished value it would say "rho = 2 and lr = 0.03 are best".
    stopped = ("stopped", 0.03, 2.0, 8, 0.0)
    alone = importance_ranking(importance_records())
    with_stopped = importance_ranking(importance_records([stopped]))
    assert set(alone) == {"fANOVA", "PED-ANOVA"}
    for evaluator, (ranking, values) in alone.items():
        assert with_stopped[evaluator][0] == ranking, evaluator
        assert with_stopped[evaluator][1] == pytest.approx(values), evaluator
    # The check can fail: the same trial counted as finished does change a ranking.
    as_finished = importance_ranking(importance_records([("finished", *stopped[1:])]))
    assert any(as_finished[e][0] != alone[e][0] for e in alone)


def test_trials_without_validation_error_are_reported_by_test_error(store, tmp_path):
    # val_fraction=0: no val_error anywhere. Such trials finished; the report must be built.
    built = build_report("no-validation", tracking_uri=store["uri"], out=tmp_path, strict=True)
    runs = built.runs
    assert runs.status_counts() == {"finished": len(NO_VALIDATION)}
    assert set(runs.trials["best_by"]) == {"test_error"}
    views = {r.spec.name: r.view for r in built.views}
    for name in ("robustness", "sensitivity", "memorization"):
        assert any("val_fraction=0" in note and "final_test_error" in note for note in views[name].notes), (
            name,
            views[name].notes,
        )
    best = views["robustness"].data["best"].set_index(["epoch", "optimizer_label"])
    for label, optimizer in (("SGD", "sgd"), ("SAM", "sam")):
        finals = {space["lr"]: final for opt, space, final in NO_VALIDATION if opt == optimizer}
        lr = min(finals, key=finals.get)
        offsets = MEMORIZING if optimizer == "sgd" else IMPROVING
        final = best.loc[("final", label)]
        assert (final["lr"], final["chosen_by"]) == (lr, "final_test_error")
        assert final["test_error"] == pytest.approx(finals[lr] + offsets[-1])
        assert np.isnan(final["val_error"])  # nothing was validated
        early = best.loc[("best", label)]
        assert early["chosen_by"] == "best_test_error"
        assert early["test_error"] == pytest.approx(finals[lr] + min(offsets))
    slice_ = views["sensitivity"].data["slice"]
    assert set(slice_["objective"]) == {"final_test_error"}
    by_key = {t.key: t.test[-1] for t in no_validation_trials()}
    assert slice_.set_index("trial_key")["val_error"].to_dict() == pytest.approx(by_key)
    assert set(views["memorization"].data["curves"]["optimizer_label"]) == {"SGD", "SAM"}


def test_choice_metric_keeps_validation_error_where_every_trial_has_it():
    import pandas as pd

    both = pd.DataFrame({"final_val_error": [0.1, 0.2], "final_test_error": [0.3, 0.1]})
    assert choice_metric(both, "final_val_error") == ("final_val_error", None)
    # One trial without it: the whole ranking moves to test error, never a mix of the two.
    mixed = both.assign(final_val_error=[0.1, float("nan")])
    column, note = choice_metric(mixed, "final_val_error")
    assert column == "final_test_error" and note.startswith("1 of 2 trials")
    assert choice_metric(both.drop(columns="final_val_error"), "final_val_error")[0] == "final_test_error"
    with pytest.raises(ValueError, match="validation-error column"):
        choice_metric(both, "final_test_error")


def test_learning_rate_slice_carries_every_plotted_trial(store, report):
    _, data = report
    slice_ = data["sensitivity"]["slice"].set_index("trial_key")
    for t in plotted(store["trials"]):
        assert slice_.loc[t.key, "lr"] == pytest.approx(t.config["lr"])
        assert slice_.loc[t.key, "val_error"] == pytest.approx(t.val[-1])


def test_heatmap_bins_a_continuous_rho_geometrically():
    # Twenty SAM trials with rho spread log-uniformly over [0.01, 0.5]: too many values for one
    # square each, so they fall in geometric ranges that hold 3 or 4 trials each.
    rhos = np.geomspace(0.01, 0.5, 20)
    records = [
        TrialRecord(
            run_id=f"r{i}",
            tags={"samtune.cell": "noise=0", "samtune.status": "finished"},
            params={
                "optimizer": "sam",
                "lr": str(0.05 + 0.01 * (i % 3)),
                "rho": repr(float(rho)),
                "m": "8",
                "batch_size": "64",
                "label_noise_rate": "0.0",
            },
            history={"val_error": [(1, 0.1 + abs(math.log10(rho / BEST_RHO)))], "test_error": [(1, 0.1)]},
        )
        for i, rho in enumerate(rhos)
    ]
    runs = tabulate("continuous", records)
    spec = next(s for s in discover_views() if s.name == "sensitivity")
    heat = spec.function(runs).data["heatmap"]
    assert len(heat) == 6 and heat["n_trials"].sum() == 20
    assert set(heat["n_trials"]) <= {3, 4}
    lowest = heat.loc[heat["best_val_error"].idxmin(), "rho_bin"]
    low, high = (float(v) for v in lowest.split("-"))
    assert low <= BEST_RHO <= high


# -- sharpness -----------------------------------------------------------------------------------


def test_sharpness_view_reports_the_known_kendall_tau(report):
    _, data = report
    # One panel row per measure: none for the bookkeeping keys logged beside them.
    assert set(data["sharpness"]["tau"]["measure"]) == set(MEASURES)
    tau = data["sharpness"]["tau"].set_index(["measure", "target", "cell"])
    n_measured = 32  # every finished trial; the stopped one was never measured
    assert tau.loc[("m_sharpness", "test error", "all"), "tau"] == pytest.approx(1.0)
    assert tau.loc[("m_sharpness", "test error", "all"), "n"] == n_measured
    assert tau.loc[("hessian_trace", "test error", "all"), "tau"] == pytest.approx(-1.0)
    # Without noise the training accuracy is the same for all, so the gap ranks like the error.
    assert tau.loc[("m_sharpness", "generalization gap", "noise=0"), "tau"] == pytest.approx(1.0)
    for noise in NOISE:
        # 12 SAM trials: the 36 pairs across lr agree, the 30 within an lr disagree.
        row = tau.loc[("adaptive_sharpness", "test error", cell_label(noise))]
        assert row["n"] == 12 and row["tau"] == pytest.approx((36 - 30) / 66)


def test_granulated_tau_sees_through_the_learning_rate(report):
    _, data = report
    psi = data["sharpness"]["granulated"]
    psi = psi[(psi["measure"] == "adaptive_sharpness") & (psi["target"] == "test error")]
    # Jiang et al.'s psi per hyperparameter: lr moves both up (+1), rho and m alone rank the
    # measure against the error (-1); their mean is the granulated tau.
    assert dict(zip(psi["hyperparameter"], psi["psi"])) == pytest.approx({"lr": 1.0, "rho": -1.0, "m": -1.0})
    assert dict(zip(psi["hyperparameter"], psi["n_groups"])) == {"lr": 12, "rho": 8, "m": 12}
    overall = data["sharpness"]["granulated_overall"].set_index(["measure", "target"])
    assert overall.loc[("adaptive_sharpness", "test error"), "granulated_tau"] == pytest.approx(-1 / 3)
    assert overall.loc[("m_sharpness", "test error"), "granulated_tau"] == pytest.approx(1.0)


# -- memorization --------------------------------------------------------------------------------


def test_memorization_curves_are_the_logged_accuracies_of_the_chosen_configs(report):
    _, data = report
    curves = data["memorization"]["curves"]
    assert set(curves["cell"]) == {cell_label(0.4)}  # a clean cell has nothing to memorize
    for label, kind, n_seeds in (("SGD", "memorizing", 2), ("SAM", "resisting", 1)):
        part = curves[curves["optimizer_label"] == label].sort_values("epoch")
        assert part["epoch"].tolist() == [1, 2, 3]
        assert part["train_acc_noisy"].tolist() == pytest.approx(ACC[kind][0])
        assert part["train_acc_true"].tolist() == pytest.approx(ACC[kind][1])
        assert (part["n_seeds"] == n_seeds).all()


# -- the page ------------------------------------------------------------------------------------


class PageParser(HTMLParser):
    """Every tag with its attributes, the section each image sits in, and the style text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.images: dict[str, list[str]] = defaultdict(list)
        self.sections: list[str] = []
        self.style = ""
        self._section = None
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self._section = attrs.get("id")
            self.sections.append(self._section)
        elif tag == "img" and self._section:
            self.images[self._section].append(attrs.get("src") or "")
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def parse(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


def test_the_page_is_self_contained(report):
    built, _ = report
    page = parse(built.index.read_text(encoding="utf-8"))
    assert {"script", "link", "iframe", "object", "embed", "video", "audio", "source"}.isdisjoint(
        tag for tag, _ in page.tags
    )
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "poster", "data", "action"):
            value = attrs.get(name)
            if value is not None:
                # Images inline, links only to anchors on the page.
                assert value.startswith("data:image/png;base64,") if name == "src" else value.startswith("#"), (
                    tag,
                    name,
                    value[:80],
                )
    assert "url(" not in page.style and "@import" not in page.style and "@font-face" not in page.style
    for name in VIEWS:
        assert len(page.images[name]) == 1, name
        png = (built.index.parent / f"{name}.png").read_bytes()
        assert page.images[name][0] == "data:image/png;base64," + base64.b64encode(png).decode()


def test_the_report_files_and_only_those_are_logged_on_the_sweep_run(store, report, tmp_path):
    from mlflow.tracking import MlflowClient

    built, _ = report
    client = MlflowClient(store["uri"])
    logged = {Path(a.path).name for a in client.list_artifacts(store["sweep_run_id"], "report")}
    assert logged == {"index.html", "trials.csv", "history.csv"} | {f"{v}.png" for v in VIEWS}
    assert {p.name for p in built.files} == logged  # the user's notes.txt stayed local
    copy = client.download_artifacts(store["sweep_run_id"], "report/index.html", str(tmp_path))
    assert Path(copy).read_bytes() == built.index.read_bytes()


def test_every_view_in_the_folder_is_shown_a_failing_one_says_why_and_stale_pngs_go(tmp_path):
    views = tmp_path / "views"
    views.mkdir()
    (views / "counts.py").write_text(
        '"""Counts: trials per cell.\nA table and\n   no figure.\n\nNot the caption."""\n'
        "from samtune.report import View\n"
        "ORDER = 1\n"
        "def view(runs):\n"
        "    return View(figure=None, data={'counts': runs.trials.groupby('cell').size()"
        ".rename('n').reset_index()}, notes=['no figure here'])\n"
    )
    (views / "broken.py").write_text('"""Broken."""\ndef view(runs):\n    raise KeyError("lr")\n')
    (views / "_helper.py").write_text("raise RuntimeError('not a view: never imported')\n")
    specs = discover_views(views)
    assert [(s.name, s.title, s.caption, s.order) for s in specs] == [
        ("counts", "Counts: trials per cell", "A table and no figure.", 1),
        ("broken", "Broken", "", 100),
    ]
    runs = tabulate(
        "tiny",
        [
            TrialRecord(
                run_id="r0",
                params={"optimizer": "sgd", "lr": "0.1"},
                tags={"samtune.cell": "noise=0", "samtune.status": "finished"},
                history={"val_error": [(1, 0.2)], "test_error": [(1, 0.25)]},
            )
        ],
    )
    rendered = render_views(runs, specs)
    assert rendered[1].view is None and rendered[1].error == "KeyError: 'lr'"
    with pytest.raises(KeyError):
        render_views(runs, specs, strict=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "counts.png").write_bytes(b"a figure from an earlier build")
    page = write_report(runs, rendered, out).read_text()
    assert not (out / "counts.png").exists()
    assert "This view failed: KeyError: &#x27;lr&#x27;" in page and "no figure here" in page
    assert parse(page).sections == ["counts", "broken", "excluded"]


def test_a_view_must_return_a_view(tmp_path):
    (tmp_path / "bad.py").write_text('"""Bad."""\ndef view(runs):\n    return 42\n')
    runs = tabulate("tiny", [])
    with pytest.raises(TypeError, match="view bad returned int, expected View"):
        render_views(runs, discover_views(tmp_path), strict=True)
    (tmp_path / "bad.py").write_text('"""Bad."""\nVIEW = 1\n')
    with pytest.raises(ReportError, match="defines no function view"):
        discover_views(tmp_path)


# -- user mistakes -------------------------------------------------------------------------------


def test_an_experiment_with_no_finished_trial_is_a_clear_error(store, tmp_path, capsys):
    with pytest.raises(
        NoFinishedTrialsError, match=r"'nothing-finished' has no finished trial to report \(2 failed, 1 running\)"
    ):
        build_report("nothing-finished", tracking_uri=store["uri"], out=tmp_path)
    code = cli.main(["report", "nothing-finished", "--tracking-uri", store["uri"], "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("samtune: error: experiment 'nothing-finished' has no finished trial")


def test_a_sweep_run_again_under_its_name_is_reported_alone(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = {**base_config(0.0), "optimizer": "sgd"}

    def one_trial(sweep_key, lr, error):
        return Trial(
            f"{sweep_key}/cell-0_noise-0/00000", "noise=0", 0.0, "finished", {**config, "lr": lr}, [error], [error]
        )

    write_sweep(uri, "again", [one_trial("again@first", 0.1, 0.3)], tmp_path, sweep_key="again@first")
    time.sleep(0.01)  # the newer sweep run starts later
    write_sweep(uri, "again", [one_trial("again@second", 0.2, 0.2)], tmp_path, sweep_key="again@second")
    newest = load_runs("again", uri).trials
    assert list(newest["lr"].astype(float)) == [0.2]
    both = load_runs("again", uri, all_sweeps=True).trials
    assert sorted(both["lr"].astype(float)) == [0.1, 0.2]


def test_an_unknown_experiment_exits_2_with_one_line(store, tmp_path, capsys):
    code = cli.main(["report", "nope", "--tracking-uri", store["uri"], "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("samtune: error: no MLflow experiment named 'nope' at sqlite:///")
    assert not any(tmp_path.iterdir())


# -- in a browser --------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed here (CI installs Debian's chromium)"
)


@dataclass
class Browsed:
    dom: str
    console: list[str]  # console messages of the page
    requests: list[str]  # URLs the page asked the network for
    screenshot: Path


def open_in_chromium(page: Path, folder: Path) -> Browsed:
    """Load `page` in headless Chromium with a fresh profile: its DOM after loading, the page's
    console messages (logged to stderr), the network requests it made (from Chromium's NetLog)
    and a screenshot."""
    netlog, shot = folder / "netlog.json", folder / "screenshot.png"
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
            f"--user-data-dir={folder / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            f"--log-net-log={netlog}",
            f"--screenshot={shot}",
            "--window-size=1280,1600",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads(netlog.read_text())
    event_names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    requests = []
    for event in log["events"]:
        params = event.get("params") or {}
        # Chromium's own housekeeping (update checks) has no origin; the page's requests do.
        if (
            event_names.get(event["type"]) == "URL_REQUEST_START_JOB"
            and "url" in params
            and params.get("initiator") != "not an origin"
            and not params["url"].startswith(("file:", "data:"))
        ):
            requests.append(params["url"])
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return Browsed(proc.stdout, console, requests, shot)


@needs_chromium
def test_the_browser_check_sees_a_network_request_and_a_console_error(tmp_path):
    # The check below would pass vacuously if it could not see these.
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body><img src="http://example.invalid/x.png"><script>console.error("probe")</script></body></html>'
    )
    seen = open_in_chromium(page, tmp_path)
    assert set(seen.requests) == {"http://example.invalid/x.png"}
    assert len(seen.console) == 1 and '"probe"' in seen.console[0]


@needs_chromium
def test_the_page_renders_offline_in_headless_chromium(report, tmp_path):
    import matplotlib.image

    built, _ = report
    page = tmp_path / "index.html"  # alone: nothing beside it to load
    shutil.copy(built.index, page)
    seen = open_in_chromium(page, tmp_path)
    assert seen.requests == [] and seen.console == []
    dom = parse(seen.dom)
    assert dom.sections == [*VIEWS, "excluded"]
    for name in VIEWS:
        assert len(dom.images[name]) == 1 and dom.images[name][0].startswith("data:image/png;base64,")
    pixels = matplotlib.image.imread(seen.screenshot)[..., :3]
    inked = (pixels < 0.9).any(axis=-1).mean()
    assert 0.02 < inked < 0.9 and pixels.std() > 0.05


# -- a real sweep --------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_of_a_real_tiny_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def samtune(*args):
        return subprocess.run(
            [sys.executable, "-m", "samtune.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=900
        )

    sweep = samtune(
        "sweep",
        str(REPO / "search_spaces/noisy_digits.py"),
        "--set",
        "epochs=2",
        "--set",
        "trials=2",
        "--set",
        "label_noise_rates=0.0,0.4",
        # A short confirmation stage, so the answer view has runs to draw.
        "--set",
        "confirm_seeds=2",
        # The study's own curves off, the m ablation of the old spelling on.
        "--set",
        "ablations=",
        "--set",
        "m_ablation=8",
        "--set",
        "fixed.sharpness_measures=m_sharpness",
        "--storage-path",
        str(tmp_path / "ray"),
        "--tracking-uri",
        uri,
    )
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    # The search's single runs first, the answer (the verdicts with their intervals) after them.
    out = sweep.stdout
    assert out.index("the search's picks per cell") < out.index("SAM vs SGD, test error") < out.index("Browse the runs")
    made = samtune("report", "noisy-digits", "--tracking-uri", uri, "--out", str(tmp_path / "out"))
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert f"report written to {tmp_path / 'out' / 'index.html'}" in made.stdout.splitlines()
    page = parse((tmp_path / "out" / "index.html").read_text())
    assert page.sections == [*VIEWS, "excluded"]
    for name in VIEWS:
        assert len(page.images[name]) == 1, name
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 0
    runs = load_runs("noisy-digits", uri)
    trials = runs.trials
    assert len(trials) == 4 and set(trials["cell"]) == {"noise=0", "noise=0.4"}
    # One pick everywhere: each cell run names its picks, and they are the trials whose settings
    # the confirmation stage ran again, the ones the robustness view draws.
    assert set(runs.picks) == {"noise=0", "noise=0.4"}
    by_key = trials.set_index("trial_key")
    for cell, picks in runs.picks.items():
        assert set(picks) == {"best_sgd", "best_sam"} and set(picks.values()) <= set(by_key.index)
        for name, key in picks.items():
            confirmed = runs.confirmations[
                (runs.confirmations["cell"] == cell) & (runs.confirmations["confirms"] == name)
            ]
            assert len(confirmed) >= 2 and {float(v) for v in confirmed["lr"]} == {float(by_key.loc[key, "lr"])}
        drawn = best_per_optimizer(
            trials[(trials["cell"] == cell) & (trials["status"] == "finished")], "final_val_error", prefer=runs.picked
        )
        assert set(drawn["config_key"]) >= {
            by_key.loc[key, "config_key"] for key in picks.values() if by_key.loc[key, "status"] == "finished"
        }
    assert set(trials["status"]) <= {"finished", "stopped", "diverged"}
    missing = samtune("report", "nope", "--tracking-uri", uri)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr


def test_the_answer_view_gives_each_cells_verdict_with_its_interval_and_selection_rule(report):
    table = report[1]["answer"]["verdicts"].set_index(["cell", "selection"])
    clear = table.loc[("noise=0", "final epoch")]
    assert clear["SGD"] == "0.310 [0.285, 0.335]" and clear["seeds"] == "3"
    assert clear["verdict"] == "SAM better: lower by 0.103 (95.0% CI -0.118 to -0.089)"
    assert table.loc[("noise=0.4", "final epoch")]["verdict"].startswith("undecided at 3 seeds")
    # Early stopping on the validation set: the epoch-2 values, 0.02 lower, labelled as such.
    assert table.loc[("noise=0", "best validation epoch")]["SGD"].startswith("0.290")
    estimates = report[1]["answer"]["estimates"]
    # The SAM baseline at noise=0 is the best SAM configuration's runs, named by the cell's tag.
    baseline = estimates[(estimates["cell"] == "noise=0") & (estimates["config"] == "sam_baseline")]
    best = estimates[(estimates["cell"] == "noise=0") & (estimates["config"] == "best_sam")]
    assert list(baseline["mean"]) == pytest.approx(list(best["mean"])) and len(baseline) == 2
    # The m curve: the ablation's m=8, and the best SAM configuration at its own m (the whole
    # batch: its runs logged no m).
    curve = report[1]["answer"]["m_curve"]
    final = curve[curve["selection"] == "final epoch"].set_index("m")
    assert list(final.index) == ["None", "8"] and final.loc["8", "seeds"] == 3
    assert (final.loc["None", "mean"], final.loc["8", "mean"]) == (pytest.approx(0.40), pytest.approx(0.36))


# -- a finetuning sweep --------------------------------------------------------------------------


def finetune_records(role_tags=lambda cell, optimizer, seed: {}) -> list[TrialRecord]:
    """Two finetuning cells (0% and 40% noise on the target), SGD and SAM on 3 seeds each, every
    run starting from its cell's pretrained point (0.10 and 0.30) and ending below it."""
    records = []
    for noise, start in ((0.0, 0.10), (0.4, 0.30)):
        cell = cell_label(noise)
        for optimizer, end in (("sgd", 0.06), ("sam", 0.04)):
            for seed in range(3):
                errors = [start - 0.01, end + noise / 10 + 0.002 * seed]
                records.append(
                    TrialRecord(
                        run_id=f"{cell}-{optimizer}-{seed}",
                        tags={"samtune.cell": cell, "samtune.status": "finished", **role_tags(cell, optimizer, seed)},
                        params={
                            "optimizer": optimizer,
                            "lr": "0.05",
                            "rho": "0.05" if optimizer == "sam" else "None",
                            "scenario": "finetune",
                            "label_noise_rate": repr(noise),
                            "seed": str(seed),
                            "epochs": "2",
                            "batch_size": "64",
                            "dataset": "digits[5-9]",
                        },
                        history={
                            "val_error": [(1, errors[0]), (2, errors[1])],
                            "test_error": [(1, errors[0]), (2, errors[1])],
                            "pretrained_test_error": [(1, start)],
                        },
                    )
                )
    return records


def test_a_finetuning_sweep_draws_noise_on_the_x_axis_and_each_cells_starting_point():
    spec = next(s for s in discover_views() if s.name == "robustness")
    view = spec.function(tabulate("finetune", finetune_records()))
    best = view.data["best"]
    # The cells vary the target's noise rate: that is the x axis, as in a label-noise sweep.
    assert sorted(set(best["x"])) == [0.0, 0.4]
    starts = view.data["starting_points"].set_index("cell")
    assert list(starts["x"]) == [0.0, 0.4]
    assert list(starts["test_error"]) == pytest.approx([0.10, 0.30])
    assert any("noise=0.4" in n and "starting point" in n and "0.300" in n for n in view.notes)


def test_the_answer_view_gives_a_finetuning_cells_starting_point_beside_sgd_and_sam():
    from samtune.report.answers import confirmation_frame

    names = {"sgd": "best_sgd", "sam": "best_sam"}
    confirmations = finetune_records(
        lambda cell, optimizer, seed: {"samtune.confirms": names[optimizer], "samtune.seed": str(seed + 1)}
    )
    runs = tabulate("finetune", finetune_records())
    runs.confirmations = confirmation_frame(confirmations)
    spec = next(s for s in discover_views() if s.name == "answer")
    view = spec.function(runs)
    starts = view.data["starting_points"].set_index("cell")["test_error"]
    assert starts.to_dict() == pytest.approx({"noise=0": 0.10, "noise=0.4": 0.30})
    verdicts = view.data["verdicts"].set_index(["cell", "selection"])
    assert verdicts.loc[("noise=0.4", "final epoch"), "verdict"].startswith("SAM better: lower by 0.020")
    assert any(n.startswith("noise=0.4: the pretrained starting point") and "0.300" in n for n in view.notes)


def test_a_new_report_folder_is_its_owners_only(store, tmp_path):
    """The page shows every run's settings and results: created 0700, as the sweep's folder."""
    out = tmp_path / "reports" / "noisy-digits"
    build_report(EXPERIMENT, tracking_uri=store["uri"], out=out)
    assert (out / "index.html").is_file()
    assert out.stat().st_mode & 0o077 == 0 and out.parent.stat().st_mode & 0o077 == 0


def test_the_answer_view_says_a_cell_lost_its_sgd_baseline_instead_of_a_verdict():
    from samtune.report.answers import confirmation_frame

    names = {"sgd": "best_sgd", "sam": "best_sam"}
    confirmations = finetune_records(
        lambda cell, optimizer, seed: {"samtune.confirms": names[optimizer], "samtune.seed": str(seed + 1)}
    )
    records = finetune_records()
    lost = next(r for r in records if r.run_id == "noise=0.4-sgd-0")
    lost.tags["samtune.status"] = "failed"
    lost.params["baseline"] = "True"
    runs = tabulate("finetune", records)
    runs.confirmations = confirmation_frame(confirmations)
    view = next(s for s in discover_views() if s.name == "answer").function(runs)
    verdicts = view.data["verdicts"].set_index(["cell", "selection"])["verdict"]
    assert verdicts.loc[("noise=0.4", "final epoch")] == "none: its SGD baseline failed"
    assert verdicts.loc[("noise=0", "final epoch")].startswith("SAM better")

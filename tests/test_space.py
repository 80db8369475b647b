"""Search space files: what a Sweep means (cells, trial configs, overrides) and what is rejected.

Fast: nothing here trains, starts Ray or touches MLflow.
"""

import pickle
import textwrap
from pathlib import Path

import optuna
import pytest

from samtune.contract.values import SpaceError
from samtune.sweep.check import check_space, fixed_trial_config
from samtune.sweep.space_file import load_space
from samtune.sweep.study import Sweep, apply_overrides
from samtune.sweep.validate import validate_trial_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.py"))

SPACE = """
from samtune.sweep.study import Sweep

def space(trial):
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "sam"])
    trial.suggest_float("lr", 0.01, 0.5, log=True)
    if optimizer == "sam":
        trial.suggest_float("rho", 0.01, 0.5)
        trial.suggest_categorical("m", [8, None])
    return {"weight_decay": 1e-4}

SWEEP = Sweep(name="s", dataset="digits", model="mlp", label_noise_rates=(0.0, 0.4),
              epochs=3, batch_size=32, trials=4, seed=7)
"""


def write(tmp_path, text, name="space.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def small_sweep(**changes):
    values = dict(name="s", dataset="digits", model="mlp", epochs=3, batch_size=32, trials=4)
    return Sweep(**{**values, **changes})


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_space_file_loads_and_checks(path):
    sweep, space = load_space(path)
    sampled = check_space(sweep, space, samples=16)
    # SGD and SAM share each cell's study; rho is searched only where SAM is chosen.
    assert {p["optimizer"] for p in sampled} == {"sgd", "sam"}
    assert all(("rho" in p) == (p["optimizer"] == "sam") for p in sampled)


def test_one_cell_per_noise_rate_each_with_its_own_rate_and_one_shared_noisy_dataset():
    sweep = small_sweep(label_noise_rates=(0.0, 0.2, 0.8), seed=3)
    cells = sweep.cells()
    assert [c.label for c in cells] == ["noise=0", "noise=0.2", "noise=0.8"]
    assert len({c.slug for c in cells}) == 3
    configs = [sweep.trial_config(c, {"lr": 0.1}) for c in cells]
    assert [c["label_noise_rate"] for c in configs] == [0.0, 0.2, 0.8]
    # Every trial of a sweep draws the same subset/noise/split (data_seed) and trains the budget.
    assert {(c["data_seed"], c["seed"], c["epochs"], c["batch_size"], c["lr"]) for c in configs} == {(3, 3, 3, 32, 0.1)}


def test_fixed_settings_reach_every_trial_and_space_values_win_over_them():
    sweep = small_sweep(fixed={"weight_decay": 1e-3, "lr": 0.05})
    config = sweep.trial_config(sweep.cells()[0], {"lr": 0.2})
    assert config["weight_decay"] == 1e-3 and config["lr"] == 0.2


def test_asha_grace_period_defaults_to_a_quarter_of_the_epochs_and_never_exceeds_them():
    assert small_sweep(epochs=16).asha_grace_period == 4
    assert small_sweep(epochs=2).asha_grace_period == 1
    assert small_sweep(epochs=2, grace_period=5).asha_grace_period == 2


def test_overrides_are_parsed_by_the_type_of_the_setting_and_leave_the_original_alone():
    sweep = small_sweep()
    changed = apply_overrides(
        sweep,
        [
            "epochs=2",
            "label_noise_rates=0.0,0.4",
            "fixed.m=none",
            "fixed.weight_decay=1e-4",
            "max_concurrent=none",
            "name=other",
        ],
    )
    assert changed.epochs == 2 and isinstance(changed.epochs, int)
    assert changed.label_noise_rates == (0.0, 0.4)
    assert changed.fixed == {"m": None, "weight_decay": 1e-4}
    assert changed.max_concurrent is None and changed.name == "other"
    assert sweep.epochs == 3 and sweep.fixed == {}


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("epoch=2", "Sweep has no setting 'epoch' (did you mean 'epochs'?)"),
        ("lr=0.1", "for a trial setting use --set fixed.lr=..."),
        ("epochs=2.5", "epochs=2.5: expected an integer"),
        ("fixed.seed=1", "'seed' is a Sweep setting; use --set seed=..."),
        ("fixed.optimizer=adam", "expected one of ['sgd', 'sam', 'asam']"),
        ("batch_size=30", "m=8"),  # a fixed m=8 no longer divides the per-worker batch
    ],
)
def test_bad_overrides_name_the_setting_and_what_was_expected(item, fragment):
    sweep = small_sweep(fixed={"m": 8})
    with pytest.raises(SpaceError) as info:
        apply_overrides(sweep, [item])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_m_is_a_divisor_of_the_per_worker_batch_or_a_whole_number_of_workers_batches():
    # 64 examples over 2 workers: 32 per worker. m groups examples for one SAM perturbation:
    # within a worker (a divisor of 32) or across k workers (k x 32 with k dividing 2).
    base = {"batch_size": 64, "workers": 2, "optimizer": "sam"}
    for m in (1, 16, 32, 64):
        assert validate_trial_config({**base, "m": m})["m"] == m
    for m in (24, 48, 128):
        with pytest.raises(SpaceError, match=f"m={m} does not divide the per-worker batch 32"):
            validate_trial_config({**base, "m": m})


def test_noise_rates_must_lie_in_zero_to_one_exclusive():
    assert small_sweep(label_noise_rates=(0.0, 0.99)).label_noise_rates == (0.0, 0.99)
    for rates in [(1.0,), (-0.1,), (0.2, 0.2)]:
        with pytest.raises(SpaceError, match="label"):
            small_sweep(label_noise_rates=rates)


def test_check_space_finds_a_bad_value_anywhere_in_a_range_and_names_its_line(tmp_path):
    path = write(
        tmp_path, SPACE.replace('trial.suggest_float("rho", 0.01, 0.5)', 'trial.suggest_float("rho", -0.2, 0.5)')
    )
    sweep, space = load_space(path)
    with pytest.raises(SpaceError) as info:
        check_space(sweep, space, samples=16)
    # Reached only in the SAM branch, on line 8 of the file, and found from the range's bound.
    assert "space.py:8: rho range [-0.2, 0.5] includes a bad value" in str(info.value)


def test_a_space_may_not_search_what_the_sweep_fixes_per_cell(tmp_path):
    path = write(
        tmp_path, SPACE.replace('trial.suggest_float("lr", 0.01, 0.5, log=True)', 'trial.suggest_int("epochs", 1, 4)')
    )
    sweep, space = load_space(path)
    with pytest.raises(SpaceError, match="space.py:6: space suggests 'epochs', which the Sweep fixes"):
        check_space(sweep, space, samples=4)


def test_an_error_while_running_the_file_names_its_line(tmp_path):
    path = write(tmp_path, "from samtune.sweep import Sweep\n\nVALUES = {}\nX = VALUES['missing']\n")
    with pytest.raises(SpaceError, match=r"space.py:4: KeyError: 'missing'"):
        load_space(path)


def test_the_space_pickles_by_path_and_samples_the_same_after_reloading(tmp_path):
    # Tune saves the searcher (and with it the space) for --resume; a reloaded space must behave alike.
    sweep, space = load_space(write(tmp_path, SPACE))
    again = pickle.loads(pickle.dumps(space))
    assert again.path == str((tmp_path / "space.py").resolve())
    for seed in range(5):
        draws = []
        for func in (space, again):
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
            trial = study.ask()
            returned = func(trial)
            draws.append((trial.params, returned))
        assert draws[0] == draws[1]


def test_a_trial_by_hand_gets_the_config_the_sweep_would_run(tmp_path):
    sweep, space = load_space(write(tmp_path, SPACE))
    cell = sweep.cell("0.4")
    config = fixed_trial_config(sweep, space, cell, {"optimizer": "sam", "lr": 0.1, "rho": 0.05, "m": 8})
    assert config == {
        **sweep.base_config(cell),
        "optimizer": "sam",
        "lr": 0.1,
        "rho": 0.05,
        "m": 8,
        "weight_decay": 1e-4,
    }
    sgd = fixed_trial_config(sweep, space, cell, {"optimizer": "sgd", "lr": 0.1})
    assert "rho" not in sgd and sgd["label_noise_rate"] == 0.4
    with pytest.raises(SpaceError, match="the space asks for 'rho'"):
        fixed_trial_config(sweep, space, cell, {"optimizer": "sam", "lr": 0.1})
    with pytest.raises(SpaceError, match="use --set epochs="):
        fixed_trial_config(sweep, space, cell, {"optimizer": "sgd", "lr": 0.1, "epochs": 2})
    with pytest.raises(SpaceError, match="this sweep has no such cell"):
        sweep.cell(0.3)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("noisy-digits", True),
        ("run 2.b_c", True),
        ("it's", False),
        ("a/b", False),
        ('q"', False),
        (" lead", False),
        ("trail ", False),
        (".hidden", False),
        ("", False),
    ],
)
def test_a_sweep_name_is_one_an_mlflow_filter_and_a_folder_can_hold(name, ok):
    if ok:
        assert small_sweep(name=name).name == name
    else:
        with pytest.raises(SpaceError, match="expected letters, digits"):
            small_sweep(name=name)


def test_the_metric_must_be_one_every_trial_reports_every_epoch(tmp_path):
    # Reported every epoch: accepted.
    assert small_sweep(metric="test_error", fixed={"val_fraction": 0.0}).metric == "test_error"
    assert small_sweep(metric="sharpness/m_sharpness", sharpness_every=1).sharpness_every == 1
    assert (
        small_sweep(
            metric="sharpness/hessian_top_eig_2", sharpness_every=1, fixed={"sharpness_measures": "hessian_top_eig"}
        ).metric
        == "sharpness/hessian_top_eig_2"
    )
    # Never, or not every epoch: refused before anything runs.
    with pytest.raises(SpaceError, match="val_loss' with val_fraction=0"):
        small_sweep(metric="val_loss", fixed={"val_fraction": 0.0})
    with pytest.raises(SpaceError, match=r"measured only every 2 epochs \(sharpness_every=2\)"):
        small_sweep(metric="sharpness/m_sharpness", sharpness_every=2)
    with pytest.raises(SpaceError, match="not among the measured sharpness_measures"):
        small_sweep(metric="sharpness/m_sharpness", sharpness_every=1, fixed={"sharpness_measures": ""})
    # A space that returns val_fraction=0 itself is caught by the check of what it produces.
    sweep, space = load_space(
        write(tmp_path, SPACE.replace('{"weight_decay": 1e-4}', '{"weight_decay": 1e-4, "val_fraction": 0.0}'))
    )
    with pytest.raises(SpaceError, match="space.py: space\\(trial\\) gave metric='val_error' with val_fraction=0"):
        check_space(sweep, space, samples=2)

"""A sweep's size and duration, said before it starts: counted against the sweep's own budget,
and measured against a real run of the sweep's model on this machine."""

import time

import pytest
import torch

from samtune.sweep.estimate import LIMIT_EPOCHS, LIMIT_S, Estimate, Size, measure_epoch, sweep_size
from samtune.sweep.study import Sweep
from samtune.trial.config import resolve_config


def sweep(**changes):
    settings = dict(
        name="s",
        dataset="digits",
        model="mlp",
        label_noise_rates=(0.0, 0.4),
        epochs=4,
        batch_size=64,
        trials=6,
        confirm_seeds=3,
        max_confirm_seeds=10,
        m_ablation=(None, 16, 4),
        m_ablation_rates=(0.4,),
    )
    return Sweep(**{**settings, **changes})


def test_the_size_counts_the_search_and_every_confirmation_round():
    size = sweep_size(sweep())
    assert size.search == 2 * 6 * 4
    # First round: best SGD, best SAM and the SAM baseline on 3 seeds in both cells, and at 40%
    # noise the two ablation m's besides the whole batch on the same 3 seeds.
    assert size.confirm_first == (2 * 3 * 3 + 2 * 3) * 4
    # Every further round: best SGD and best SAM up to 10 seeds, in both cells.
    assert size.confirm_most == size.confirm_first + 2 * 2 * 7 * 4
    assert sweep_size(sweep(confirm_seeds=0)).confirm_most == 0


def test_a_measured_epoch_is_within_reach_of_a_real_one():
    """The estimate's epoch against an epoch of real training, timed here: the same order of
    magnitude (the estimate leaves out data loading and bookkeeping)."""
    from samtune.trial.entry import fit

    s = sweep(epochs=1, trials=1, confirm_seeds=0, label_noise_rates=(0.0,), model="cnn_small")
    config = resolve_config({**s.base_config(s.cells()[0]), "sharpness_measures": "", "optimizer": "sgd", "lr": 0.05})
    estimated = measure_epoch(s, config)
    torch.set_num_threads(1)
    fit({**config, "epochs": 1})  # warm: the first run pays for loading the data
    start = time.perf_counter()
    fit({**config, "epochs": 2})
    real = (time.perf_counter() - start) / 2
    assert real / 5 < estimated < real * 3, (estimated, real)


def test_too_big_is_said_by_time_where_measured_and_by_size_where_not():
    size = Size(cells=1, trials=10, epochs=10, search=100, confirm_first=0, confirm_most=0)
    assert Estimate(size, 1.0, 2, 50.0, 100.0).too_big() == ""
    assert "may take" in Estimate(size, 1.0, 2, 50.0, LIMIT_S + 1).too_big()
    huge = Size(cells=1, trials=LIMIT_EPOCHS, epochs=2, search=2 * LIMIT_EPOCHS, confirm_first=0, confirm_most=0)
    assert "trial-epochs" in Estimate(huge, None, None, None, None, "no GPU here").too_big()
    assert "no duration estimate: no GPU here" in Estimate(huge, None, None, None, None, "no GPU here").text()


@pytest.mark.parametrize("yes", [False, True])
def test_a_sweep_past_two_days_needs_yes(tmp_path, monkeypatch, yes):
    from samtune.sweep.driver import prepare
    from samtune.sweep.errors import SweepError

    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.py"
    space.write_text(
        "from samtune.sweep.study import Sweep\n"
        "def space(trial):\n"
        "    trial.suggest_float('lr', 0.01, 0.5, log=True)\n"
        "SWEEP = Sweep(name='t', dataset='digits', model='mlp', epochs=100000, batch_size=32, trials=50)\n"
    )
    args = dict(storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/m.db", yes=yes)
    if not yes:
        with pytest.raises(SweepError, match="too big to start unasked: it may take .*--yes"):
            prepare(str(space), **args)
        assert not (tmp_path / "runs" / "t").exists()
        return
    plan = prepare(str(space), **args)
    assert plan.estimate.at_most > LIMIT_S and "trial-epochs" in plan.estimate.text()

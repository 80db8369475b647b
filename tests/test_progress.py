"""Where a sweep is: each stage's done/total and its time left, live or as plain log lines."""

import io

from rich.console import Console

from samtune.sweep.progress import StageProgress, duration
from samtune.sweep.view import PROGRESS_EVERY_S, SweepView


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 45.4, 60, 185, 3725)] == ["0s", "45s", "1m00s", "3m05s", "1h02m"]


def test_time_left_is_the_epochs_to_go_at_the_pace_so_far():
    clock = Clock()
    stage = StageProgress("confirmation round 1", runs=4, epochs=40, clock=clock)
    assert stage.text() == "confirmation round 1: 0/4 runs ended, 0/40 epochs, 0s in, time left: after the first epoch"
    clock.now += 20
    for _ in range(10):
        stage.epoch_done()
    # 10 epochs in 20 s: the other 30 take 60 s.
    assert stage.seconds_left() == 60
    assert stage.text() == "confirmation round 1: 0/4 runs ended, 10/40 epochs, 20s in, about 1m00s left"
    for _ in range(4):
        stage.run_ended()
    assert stage.text().endswith(", done")


def test_a_search_with_early_stopping_gives_an_upper_bound_that_shrinks_as_trials_stop():
    clock = Clock()
    stage = StageProgress("search", runs=4, epochs=4 * 16, upper_bound=True, unit="trials", clock=clock)
    clock.now += 32
    for _ in range(16):
        stage.epoch_done()
    assert stage.text() == "search: 0/4 trials ended, 16/64 epochs, 32s in, at most 1m36s left"
    # Two trials stopped at epoch 4: 24 of the budget's epochs will never run.
    stage.run_ended(epochs_left=12)
    stage.run_ended(epochs_left=12)
    assert stage.epochs == 40
    assert stage.seconds_left() == 48


def test_off_a_terminal_the_view_prints_a_progress_line_every_period_and_once_at_the_end():
    out = io.StringIO()
    view = SweepView(Console(file=out, width=200, force_terminal=False))
    clock = Clock()
    stage = StageProgress("confirmation round 2", runs=2, epochs=4, clock=clock)
    view.stage(stage)
    stage.epoch_done()
    view.tick()
    clock.now += PROGRESS_EVERY_S / 2
    view.tick()
    assert out.getvalue() == ""  # not yet time
    clock.now += PROGRESS_EVERY_S / 2
    view.tick()
    assert out.getvalue().splitlines() == ["confirmation round 2: 0/2 runs ended, 1/4 epochs, 30s in, about 1m30s left"]
    for _ in range(3):
        stage.epoch_done()
    stage.run_ended()
    stage.run_ended()
    view.tick()
    view.tick()
    assert out.getvalue().splitlines()[1:] == ["confirmation round 2: 2/2 runs ended, 4/4 epochs, 30s in, done"]


def _live_view_at(width):
    from types import SimpleNamespace

    from samtune.sweep import Sweep
    from samtune.sweep.results import CellResult, TrialRow

    sweep = Sweep(name="narrow", dataset="digits", model="cnn", epochs=16, batch_size=64, trials=2)
    cell = sweep.cells()[0]
    result = CellResult(cell)
    result.trials["f3a9c2d1"] = TrialRow(
        "f3a9c2d1",
        {"optimizer": "sam", "lr": 0.0123, "rho": 0.0456, "m": 16},
        status="running",
        epoch=7,
        metrics={"val_error": 0.41667, "test_error": 0.07222, "train_acc_true": 0.931, "train_acc_noisy": 0.602},
    )
    recorder = SimpleNamespace(cell=cell, ended=0, result=result)
    out = io.StringIO()
    view = SweepView(Console(file=out, width=width, force_terminal=True, color_system=None))
    view.start(SimpleNamespace(sweep=sweep, tracking_uri="sqlite:///x.db"), [cell])
    view.update(recorder)
    view.stop()
    return out.getvalue()


def test_on_a_narrow_terminal_the_live_table_drops_columns_rather_than_cut_values():
    wide, narrow = _live_view_at(160), _live_view_at(80)
    assert "acc true/noisy" in wide and "0.931/0.602" in wide and "lr=0.012" in wide
    # At 80 columns: the trial id, status, epoch and both errors in full, and no value cut short.
    assert "acc true/noisy" not in narrow and "…" not in narrow
    for value in ("f3a9c2d1", "running", "7/16", "0.417", "0.072"):
        assert value in narrow, narrow
    assert max(len(line) for line in narrow.splitlines() if "│" in line or "┃" in line) <= 80
    # The header names the store in one piece, for copying, at any width.
    assert "MLflow: sqlite:///x.db" in narrow

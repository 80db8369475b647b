"""Ctrl-C during a sweep is never lost, against Tune's own SIGINT handler (the real one, as
``Tuner.fit()`` installs it) rather than a stand-in."""

import os
import signal
import time

import pytest
from ray.tune.tune import _setup_signal_catching

from samtune.sweep.interrupts import InterruptWatch


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(autouse=True)
def tune_catches_sigint(monkeypatch):
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_outside_fit_raises_and_is_recorded():
    with InterruptWatch() as watch:
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()
    assert watch.interrupted


def test_ctrl_c_between_cells_is_not_swallowed_by_the_handler_tune_left_behind():
    with InterruptWatch() as watch:
        with watch.tune_fit():
            event = _setup_signal_catching()  # a fit that ends without a signal
        assert not watch.interrupted
        # Tune left its handler installed; without the watch this Ctrl-C would only set `event`.
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()
        assert not event.is_set() and watch.interrupted


def test_ctrl_c_that_tune_caught_after_its_loop_ended_is_reported():
    with InterruptWatch() as watch:
        with watch.tune_fit():
            event = _setup_signal_catching()
            ctrl_c()  # Tune's handler: sets its event, raises nothing
            assert event.is_set()
        assert watch.interrupted
        # The watch's own handler is back for what follows.
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()


def test_leaving_the_watch_restores_the_handler_it_found():
    def mine(signum, frame):
        pass

    signal.signal(signal.SIGINT, mine)
    with InterruptWatch() as watch:
        with watch.tune_fit():
            _setup_signal_catching()
    assert signal.getsignal(signal.SIGINT) is mine and not watch.interrupted


def test_with_tunes_handler_disabled_a_ctrl_c_inside_fit_raises(monkeypatch):
    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")
    with InterruptWatch() as watch:
        with pytest.raises(KeyboardInterrupt):
            with watch.tune_fit():
                _setup_signal_catching()
                ctrl_c()
    assert watch.interrupted


def test_sigterm_is_a_ctrl_c_while_the_watch_is_installed():
    before = signal.getsignal(signal.SIGTERM)  # Ray's, where an earlier test started Ray here
    watch = InterruptWatch().install()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes
                time.sleep(0.01)
        assert watch.interrupted
    finally:
        watch.remove()
    assert signal.getsignal(signal.SIGTERM) == before

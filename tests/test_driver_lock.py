"""One driver per sweep: the storage lock, against live and killed holders."""

import os
import signal
import subprocess
import sys
import time

import pytest

from samtune.sweep.driver_lock import DriverLock, SweepBusy

HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from samtune.sweep.driver_lock import DriverLock\n"
    "lock = DriverLock.acquire(Path(sys.argv[1]), 't')\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_second_holder_in_this_process_is_refused_until_the_first_lets_go(tmp_path):
    first = DriverLock.acquire(tmp_path, "t")
    with pytest.raises(SweepBusy, match=rf"sweep 't' is already running \(driver pid {os.getpid()} on \S+ since "):
        DriverLock.acquire(tmp_path, "t")
    DriverLock.acquire(tmp_path, "other").release()  # another sweep in the same storage is free
    first.release()
    DriverLock.acquire(tmp_path, "t").release()


def test_a_killed_driver_holds_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepBusy, match=rf"driver pid {holder.pid} "):
            DriverLock.acquire(tmp_path, "t")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    started = time.time()
    lock = DriverLock.acquire(tmp_path, "t")  # no stale lock to wait out or clean
    assert time.time() - started < 1
    lock.release()


def test_the_sweep_refuses_a_second_driver_before_reading_the_sweep(tmp_path, capsys):
    from samtune.cli import main

    space = tmp_path / "s.py"
    space.write_text(
        "from samtune.sweep import Sweep\n"
        "def space(trial):\n"
        "    trial.suggest_float('lr', 0.01, 0.1)\n"
        "SWEEP = Sweep(name='t', dataset='digits', model='mlp', epochs=1, batch_size=64, trials=1)\n"
    )
    (tmp_path / "runs").mkdir()
    holder = DriverLock.acquire(tmp_path / "runs", "t")
    try:
        # Even --resume of a sweep with no state yet is refused for the lock, not for the state.
        for extra in ([], ["--resume"]):
            assert (
                main(
                    [
                        "sweep",
                        str(space),
                        "--storage-path",
                        str(tmp_path / "runs"),
                        "--tracking-uri",
                        f"sqlite:///{tmp_path}/m.db",
                        *extra,
                    ]
                )
                == 2
            )
            err = capsys.readouterr().err
            assert (
                err.startswith("samtune: error: sweep 't' is already running (driver pid ") and err.count("\n") == 1
            ), err
    finally:
        holder.release()
    assert not (tmp_path / "runs" / "t").exists() and not (tmp_path / "m.db").exists()

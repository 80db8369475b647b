"""Shared test setup: one thread per process, so several test processes share 2 cores fairly."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

#: A process that keeps one core busy at the default priority: what another job on the machine is.
_SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@pytest.fixture
def busy_machine():
    """Every core this test may use kept busy by a process of its own (pinned to it, at the
    default priority), for the test's duration; stopped by PID afterwards."""
    cores = sorted(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN, str(core)]) for core in cores]
    try:
        yield len(spinners)
    finally:
        for proc in spinners:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


from object_store import s3_server  # noqa: E402,F401  (the fixture, shared by the object-storage tests)

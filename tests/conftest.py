"""Shared test setup: one thread per process, so several test processes share 2 cores fairly."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

"""Where a trial reports each epoch's metrics and checkpoint, and where it resumes from: this
process (a checkpoint folder, or none) or Ray (a Train worker's or a Tune trial's report and
checkpoint). The checkpoint itself is one ``trial.pt`` file, written atomically.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- reporting contexts
class Session:
    """Where a run reports to and resumes from: plain process, Ray Train worker or Tune trial."""

    rank = 0
    world_size = 1
    inject_faults = True

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def load(self) -> dict[str, Any] | None:
        return None


class LocalSession(Session):
    """This process; with an initialised `torch.distributed` group (torchrun), one rank of it."""

    def __init__(self, report: Callable[[dict], None] | None, checkpoint_dir: str | None, alone: bool = False):
        self._report = report
        self._dir = checkpoint_dir
        # A pretraining stage inside a worker must not kill it for a fault meant for the trial.
        self.inject_faults = not alone
        if not alone and dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if self._dir is not None and state is not None and self.rank == 0:
            os.makedirs(self._dir, exist_ok=True)
            _atomic_save(state, os.path.join(self._dir, _CKPT_FILE))
        if self._report is not None:
            self._report(dict(metrics))

    def load(self) -> dict[str, Any] | None:
        if self._dir is None:
            return None
        path = os.path.join(self._dir, _CKPT_FILE)
        return _load_state(path) if os.path.exists(path) else None


class RaySession(Session):
    """Ray Train worker (`ray.train`) or Tune function trainable (`ray.tune`): same shape of API."""

    def __init__(self, api: ModuleType) -> None:
        self._api = api
        if api.__name__.startswith("ray.train"):
            ctx = api.get_context()
            self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None or self.rank != 0:
            self._api.report(metrics)  # every worker must call report: it is a barrier
            return
        with tempfile.TemporaryDirectory(prefix="samtune-ckpt-") as tmp:
            _atomic_save(state, os.path.join(tmp, _CKPT_FILE))
            self._api.report(metrics, checkpoint=self._api.Checkpoint.from_directory(tmp))

    def load(self) -> dict[str, Any] | None:
        checkpoint = self._api.get_checkpoint()
        if checkpoint is None:
            return None
        try:
            with checkpoint.as_directory() as folder:
                return _load_state(os.path.join(folder, _CKPT_FILE))
        except Exception as exc:  # noqa: BLE001  deleted, cut short or damaged: any of them means the same
            # The newest checkpoint is gone or damaged (deleted by hand, a full disk): an older
            # one of the same trial costs some epochs, failing the trial costs all of them.
            older = _older_readable(str(checkpoint.path))
            if older is None:
                raise
            print(
                f"samtune: checkpoint {checkpoint.path} cannot be read ({type(exc).__name__}: {exc}); "
                f"resuming from {older[0]}",
                file=sys.stderr,
            )
            return older[1]


_CKPT_FILE = "trial.pt"


def _older_readable(newest: str) -> tuple[str, dict] | None:
    """The newest checkpoint beside ``newest`` (Ray names them ``checkpoint_<index>`` in the
    trial's folder) whose state reads, and that state; None if there is none, or if the folder
    is not on this machine's file system."""
    trial_dir = os.path.dirname(newest.rstrip("/"))
    try:
        names = sorted((n for n in os.listdir(trial_dir) if n.startswith("checkpoint_")), reverse=True)
    except OSError:
        return None
    for name in names:
        path = os.path.join(trial_dir, name)
        if os.path.abspath(path) == os.path.abspath(newest):
            continue
        try:
            return path, _load_state(os.path.join(path, _CKPT_FILE))
        except Exception:  # noqa: BLE001  an unreadable one: try the next older
            continue
    return None


def _atomic_save(state: dict, path: str) -> None:
    # Write then rename: a crash mid-write never leaves a truncated checkpoint behind.
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """The trial state a checkpoint folder holds (what `samtune.trial.state.checkpoint` saved:
    ``model`` weights, ``optimizer``, ``epoch``, ``metrics``, ...), on the CPU."""
    return _load_state(os.path.join(folder, _CKPT_FILE))


# ----------------------------------------------------------------------------- building blocks
def in_ray_train() -> bool:
    """Whether this process is a Ray Train worker (without importing Ray where it isn't loaded)."""
    if "ray.train" not in sys.modules:
        return False
    try:
        sys.modules["ray.train"].get_context().get_world_rank()
        return True
    except Exception:  # ray.train raises outside a worker (driver, Tune trial, plain process)
        return False

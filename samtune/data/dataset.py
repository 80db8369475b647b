"""The in-memory `Dataset` (uint8 images and int64 labels per split), its errors and data root,
and `CachedSource`: the tensor cache file a dataset was read through.

Also the per-channel statistics of the known datasets, used to normalise their batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from samtune.data.transforms import channel_stats

#: Dataset names `load_dataset` knows besides ``imagefolder:<path>`` (any may carry ``[classes]``).
DATASETS = ("digits", "cifar10", "cifar100")


# Per-channel mean/std of the training split, in the 0..1 pixel scale. CIFAR values are the usual
# published ones; `Dataset.mean`/`std` fall back to computing them from the training split.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


DIGITS_TEST_SIZE = 360  # of 1,797: leaves 1,437 for training (an 80/20 split)


@dataclass(frozen=True)
class CachedSource:
    """Where a dataset's tensors were read through the decoded-tensor cache (`samtune.data.cache`):
    the cache file, the fingerprint of the source it was decoded from, and the SHA-256 of the
    tensors. What is checked on those tensors can be recorded beside the file, keyed by both."""

    file: Path
    fingerprint: str
    sha256: str


@dataclass
class Dataset:
    """One dataset, both splits, in memory.

    Images are uint8 ``[N, C, H, W]``, labels int64 ``[N]`` in ``0..num_classes-1``; ``classes[i]``
    names label ``i``. Normalise batches with ``to_float(x, dataset.mean, dataset.std)``.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    _stats: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, repr=False)
    #: Set when the tensors came through the cache; None otherwise (and for a class selection).
    cached_as: CachedSource | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def mean(self) -> tuple[float, ...]:
        return self._normalisation()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._normalisation()[1]

    def _normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self._stats is None:
            known = DATASET_STATS.get(self.name)
            self._stats = known if known is not None else channel_stats(self.train_x)
        return self._stats


class DataNotFoundError(FileNotFoundError):
    """The dataset is not on disk and could not be downloaded; the message says where we looked."""


class DataUnreadableError(ValueError):
    """The dataset is on disk but cannot be read: a truncated or corrupt archive, a missing file."""


def samtune_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samtune"


def default_data_root() -> Path:
    """``$SAMTUNE_DATA_ROOT`` if set, else ``~/.cache/samtune/data`` (where downloads go)."""
    env = os.environ.get("SAMTUNE_DATA_ROOT")
    return Path(env).expanduser() if env else samtune_home() / "data"

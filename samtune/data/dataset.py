"""Datasets as whole uint8 tensors, plus batched augmentation and normalisation.

Every dataset is held in memory as one uint8 tensor per split (`[N, C, H, W]`) and one int64
label tensor, as fast CIFAR loaders do (KellerJordan/cifar10-airbench): a training epoch is index
arithmetic and a few tensor ops on whole batches, never per-image Python or loader workers.

Datasets (`load_dataset(name, data_root)`):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes). It ships
  with scikit-learn, so it needs no download. Pixel values 0..16 are scaled to uint8 0..255; the
  train/test split is fixed (seed 0, stratified): 1,437 train, 360 test.
- ``cifar10`` / ``cifar100``: found under ``data_root`` (or ``$SAMTUNE_DATA_ROOT``, else
  ``~/.cache/samtune/data``) as the canonical pickled folder (``cifar-10-batches-py/``,
  ``cifar-100-python/``, what ``torchvision.datasets`` downloads), an ImageFolder tree
  (``train/<class>/*.jpg`` and ``test/<class>/*.jpg``), or a ``.tar.gz`` of either. With none there,
  torchvision downloads the pickled copy when the host answers within a few seconds; offline
  (or with ``SAMTUNE_OFFLINE=1``) a `DataNotFoundError` lists the paths tried and how to supply
  the data. Class indices follow CIFAR's own order whatever the source.
- ``imagefolder:<path>``: any ImageFolder tree or ``.tar.gz`` of one (``train/`` plus ``test/`` or
  ``val/``); class indices follow sorted class-folder names, as in ``torchvision.datasets.ImageFolder``.
  Images are decoded to RGB and must share one size.

Any name may end in a class selection, ``cifar10[0-4]`` or ``cifar100[3,7,10-19]``: only those
classes (indices in the full dataset's order) are kept, relabelled ``0..k-1`` in ascending order
of the original index. This gives transfer pairs within one dataset (pretrain on ``cifar10[0-4]``,
finetune on ``cifar10[5-9]``).

Decoded images (ImageFolder trees, and tarballs of a tree or of the pickled CIFAR files) are
cached as one tensor file: under ``$SAMTUNE_CACHE_DIR`` if set, else next to the data when that
folder is writable, else under ``~/.cache/samtune``. The file name carries a fingerprint of the
source (path, size, modification times), and the file carries a SHA-256 of its tensors: a stale
cache is never used and a corrupt one is rebuilt. Measured on the shared 60,000-JPEG CIFAR-10
tarball (2 shared CPU cores): first decode about 6 s, cached load well under 3 s; see
``benchmarks/data.py``.
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


def _samtune_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samtune"


def default_data_root() -> Path:
    """``$SAMTUNE_DATA_ROOT`` if set, else ``~/.cache/samtune/data`` (where downloads go)."""
    env = os.environ.get("SAMTUNE_DATA_ROOT")
    return Path(env).expanduser() if env else _samtune_home() / "data"

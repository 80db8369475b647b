"""Datasets as whole uint8 tensors, plus batched augmentation and normalisation.

Every dataset is held in memory as one uint8 tensor per split (`[N, C, H, W]`) and one int64
label tensor, as fast CIFAR loaders do (KellerJordan/cifar10-airbench): a training epoch is index
arithmetic and a few tensor ops on whole batches, never per-image Python or loader workers.

Datasets (`load_dataset(name, data_root)`):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes). It ships
  with scikit-learn, so it needs no download. Pixel values 0..16 are scaled to uint8 0..255; the
  train/test split is fixed (seed 0, stratified): 1,437 train, 360 test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "load_dataset",
    "to_float",
    "augment_batch",
    "DATASET_STATS",
]

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


def channel_stats(x: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``[N, C, H, W]`` in the 0..1 scale.

    Accumulates in float64 over chunks so large datasets need no full float copy. A channel with
    zero spread gets std 1.0 (normalising by zero would give infinities).
    Raises ValueError for an empty or non-4D tensor.
    """
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected non-empty images [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def to_float(x_uint8: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 images ``[N, C, H, W]`` (or ``[C, H, W]``) -> float32 ``(x/255 - mean) / std``.

    ``mean``/``std`` are per channel in the 0..1 scale (length C, or one value for all channels).
    Runs on the tensor's device. Raises ValueError when their length does not match C.
    """
    c = x_uint8.shape[-3]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).reshape(-1)
    if mean_t.numel() not in (1, c) or std_t.numel() not in (1, c):
        raise ValueError(
            f"mean/std need 1 or {c} values (one per channel), got {mean_t.numel()} and {std_t.numel()}"
        )
    # Fold /255 into the affine map: one multiply-add over the batch instead of three passes.
    scale = (1.0 / (255.0 * std_t)).reshape(-1, 1, 1)
    shift = (-mean_t / std_t).reshape(-1, 1, 1)
    return x_uint8.to(torch.float32).mul_(scale).add_(shift)


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> Tensor:
    """Random crop with zero padding and random horizontal flip, on a whole batch at once.

    ``x`` is ``[N, C, H, W]`` (any dtype, any device): each image is zero-padded by ``pad`` pixels on
    every side and a random ``H x W`` window is taken (the torchvision ``RandomCrop(H, padding=pad)``
    convention used for CIFAR), then mirrored left-right with probability 1/2. Randomness comes only
    from ``generator`` (on CPU or on ``x``'s device), so a seeded generator gives the same batch.
    ``pad == 0`` skips the crop. Returns a new tensor; ``x`` is not modified.
    Raises ValueError for a non-4D input or a negative ``pad``.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects [N, C, H, W], got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, _, h, w = x.shape
    gen_device = generator.device
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [N, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [N, 1, W]
        batch = torch.arange(n, device=x.device)[:, None, None]
        # One gather for the whole batch: advanced indices give [N, H, W, C]; back to NCHW.
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
    else:
        x = x.clone()
    if flip:
        mirror = torch.rand(n, generator=generator, device=gen_device).to(x.device) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float64)  # [1797, 8, 8], values 0..16
    x = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(bunch.target).to(torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=DIGITS_TEST_SIZE, stratify=y.numpy(), random_state=0
    )
    train_idx_t = torch.from_numpy(train_idx).sort().values
    test_idx_t = torch.from_numpy(test_idx).sort().values
    return Dataset(
        name="digits",
        train_x=x[train_idx_t].contiguous(),
        train_y=y[train_idx_t].contiguous(),
        test_x=x[test_idx_t].contiguous(),
        test_y=y[test_idx_t].contiguous(),
        classes=[str(i) for i in range(10)],
    )


def load_dataset(name: str, data_root: str | None = None) -> Dataset:
    """Load a dataset by name: ``digits`` (more to come).

    Raises ValueError for an unknown name.
    """
    key = name.strip().lower()
    if key == "digits":
        return _load_digits()
    raise ValueError(f"unknown dataset {name!r}; expected 'digits', 'cifar10', 'cifar100' or 'imagefolder:<path>'")

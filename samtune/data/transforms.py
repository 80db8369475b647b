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

from typing import Sequence

import torch
from torch import Tensor


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

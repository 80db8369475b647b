"""Batched augmentation and normalisation of uint8 image tensors.

Each function works on a whole batch ``[N, C, H, W]`` at once, on any device: random crop and
flip (`augment_batch`), uint8 to normalised float (`to_float`) and the per-channel statistics
that normalisation uses (`channel_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence

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
        raise ValueError(f"mean/std need 1 or {c} values (one per channel), got {mean_t.numel()} and {std_t.numel()}")
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

"""A trial's random streams, each re-derived from (seed, epoch, rank) where it is used.

Nothing random is carried from one epoch to the next in a generator, so a run resumed from the
checkpoint of epoch k draws exactly what the uninterrupted run drew from epoch k + 1 on.

>>> epoch_order(5, seed=0, epoch=1).tolist() == epoch_order(5, seed=0, epoch=1).tolist()
True
>>> sorted(fixed_train_order(4, seed=0).tolist())
[0, 1, 2, 3]
"""

from __future__ import annotations

import torch
from torch import Tensor


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The global shuffle of epoch `epoch`: identical on every worker and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Restart the global generator (dropout, stochastic layers) from (seed, epoch, rank)."""
    torch.manual_seed((seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1))


def augmentation_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator this worker's augmentation draws from during epoch `epoch`."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 1009 + rank)


def fixed_train_order(n: int, seed: int) -> Tensor:
    """A permutation of the training examples seeded with `seed + 7919`, the same at every epoch:
    its first indices are the examples `train_error` and sharpness are measured on."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))


def sharpness_indices(n: int, seed: int, subset: int) -> Tensor:
    """The training examples sharpness is measured on: the first `subset` of `fixed_train_order`
    (the same examples at every epoch)."""
    return fixed_train_order(n, seed)[: min(subset, n)]

"""Worst-case and average-case sharpness: how much the loss rises when the weights move.

- ``m_sharpness`` (Foret et al. 2020): mean over disjoint batches B of m examples of
  ``max_{||eps||_2 <= rho} L_B(w + eps) - L_B(w)``; the maximum by projected gradient ascent
  (``steps=1`` is SAM's own one-step estimate ``eps = rho g / ||g||``; the largest value over the
  iterates is kept, so more steps never report less).
- ``adaptive_sharpness`` (Andriushchenko et al. 2023): the same over the ball scaled by
  ``T = |w| + eta`` (``||T^-1 eps||_2 <= rho`` or ``||T^-1 eps||_inf <= rho``).
- ``avg_sharpness``: ``E[L(w + delta)] - L(w)``, ``delta ~ N(0, sigma^2 diag(c^2))``, ``c = 1`` or
  ``|w|`` (``adaptive=True``), Monte Carlo over ``samples`` antithetic pairs (+delta, -delta).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from samtune.sharpness.estimate import Estimate
from samtune.sharpness.hvp import FlatLoss, LossFn, chunks, measuring


# ------------------------------------------------------------------------------ worst case
def _ascent(f: FlatLoss, x: Tensor, y: Tensor, rho: float, steps: int, scale: Tensor | None, norm: str) -> Tensor:
    """max over the (scaled) ball of L(w + eps) - L(w), by projected normalised gradient ascent."""
    base, g = f.gradient(f.w, x, y)
    best = torch.zeros((), device=f.w.device, dtype=base.dtype)
    eps = torch.zeros_like(f.w)
    t2 = scale * scale if scale is not None else None
    for step in range(steps):
        if norm == "l2":
            tg = g if scale is None else scale * g
            direction = (tg if scale is None else scale * tg) / tg.norm().clamp_min(1e-12)
        else:  # linf: the steepest direction of the scaled max-norm ball
            direction = torch.sign(g) if scale is None else scale * torch.sign(g)
        # Step 0 is SAM's full step to the boundary; later steps shrink so the iterates settle.
        alpha = rho if step == 0 else rho / math.sqrt(step + 1)
        eps = _project(eps + alpha * direction, rho, scale, norm, t2)
        loss, g = f.gradient(f.w + eps, x, y)
        best = torch.maximum(best, loss - base)
    return best


def _project(eps: Tensor, rho: float, scale: Tensor | None, norm: str, t2: Tensor | None) -> Tensor:
    if norm == "linf":
        if scale is None:
            return eps.clamp(-rho, rho)
        bound = rho * scale
        return torch.maximum(torch.minimum(eps, bound), -bound)
    # Coordinates with |w| = 0 (e.g. zero biases, eta = 0) cannot move: 0/0 counts as 0.
    size = (eps if scale is None else torch.where(scale > 0, eps / scale.clamp_min(1e-30), 0.0)).norm()
    return eps * torch.clamp(rho / size.clamp_min(1e-12), max=1.0)


def _worst_case(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    rho: float,
    m: int,
    steps: int,
    adaptive: bool,
    eta: float,
    norm: str,
    params: Sequence[str] | None,
) -> Tensor:
    if rho < 0 or steps < 1 or m < 1:
        raise ValueError(f"need rho >= 0, steps >= 1, m >= 1; got rho={rho}, steps={steps}, m={m}")
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    with measuring(model):
        f = FlatLoss(model, loss_fn, params)
        scale = f.w.abs() + eta if adaptive else None
        groups = chunks(len(y) - len(y) % m if len(y) >= m else len(y), m)
        values = [_ascent(f, x[g], y[g], rho, steps, scale, norm) for g in groups]
    return torch.stack(values).mean()


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    rho: float = 0.05,
    m: int = 128,
    steps: int = 1,
    params: Sequence[str] | None = None,
) -> float:
    """Mean over disjoint batches of m examples of the worst-case loss rise in the L2 ball of
    radius rho (a last partial batch is dropped unless it is the only one)."""
    return float(
        _worst_case(model, loss_fn, x, y, rho=rho, m=m, steps=steps, adaptive=False, eta=0.0, norm="l2", params=params)
    )


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    rho: float = 0.5,
    m: int = 128,
    steps: int = 1,
    eta: float = 0.0,
    norm: str = "l2",
    params: Sequence[str] | None = None,
) -> float:
    """Worst-case sharpness over the ball scaled by ``|w| + eta`` (L2 or L-infinity)."""
    return float(
        _worst_case(model, loss_fn, x, y, rho=rho, m=m, steps=steps, adaptive=True, eta=eta, norm=norm, params=params)
    )


# ------------------------------------------------------------------------------ average case
def avg_sharpness_estimate(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    sigma: float = 0.01,
    samples: int = 8,
    adaptive: bool = False,
    seed: int = 0,
    batch: int = 512,
    params: Sequence[str] | None = None,
) -> Estimate[float]:
    """``E[L(w + delta)] - L(w)`` with ``delta ~ N(0, sigma^2 c^2)``, c = 1 or |w|; Monte Carlo
    over ``samples`` independent antithetic pairs, with its standard error (the pairs' sample
    standard deviation over the square root of their number; None for one pair)."""
    if sigma < 0 or samples < 1:
        raise ValueError(f"need sigma >= 0 and samples >= 1, got sigma={sigma}, samples={samples}")
    with measuring(model), torch.no_grad():
        f = FlatLoss(model, loss_fn, params)
        gen = torch.Generator(device=f.w.device).manual_seed(seed)
        c = f.w.abs() if adaptive else torch.ones_like(f.w)
        parts = chunks(len(y), batch)

        def mean_loss(flat: Tensor) -> Tensor:
            return sum(f.value(flat, x[p], y[p]) * (p.stop - p.start) for p in parts) / len(y)

        base = mean_loss(f.w)
        rises: list[Tensor] = []
        for _ in range(samples):
            delta = sigma * c * torch.randn(f.w.shape, generator=gen, device=f.w.device, dtype=f.w.dtype)
            # Antithetic pair: the first-order term cancels exactly, leaving the curvature term.
            rises.append(0.5 * (mean_loss(f.w + delta) + mean_loss(f.w - delta)) - base)
    stacked = torch.stack(rises)
    stderr = float(stacked.std() / math.sqrt(samples)) if samples > 1 else None
    return Estimate(float(stacked.mean()), stderr=stderr)


def avg_sharpness(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, **settings: Any) -> float:
    """Average-case sharpness (`avg_sharpness_estimate`'s settings), the value alone."""
    return avg_sharpness_estimate(model, loss_fn, x, y, **settings).value

"""The Hessian's eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019, as
PyHessian draws it): a whole-spectrum picture, too costly to take on every trial.

Each of ``probes`` Rademacher vectors v (``||v||^2 = n``) starts ``steps`` Lanczos iterations
with full reorthogonalisation; the tridiagonal matrix's eigenvalues theta_i (nodes) and the
squared first components of its eigenvectors (weights, summing to 1) are the Gauss quadrature
of the measure ``sum_j (u_j^T v)^2 / n delta(lambda_j)``, whose expectation over v is the
spectral density ``(1/n) sum_j delta(lambda_j)``. Averaged over probes and each node widened
into a Gaussian of standard deviation ``sigma``, it is the density `SpectralDensity.curve`
draws. Its moments ``sum_i w_i theta_i^p`` equal ``v^T H^p v / n`` exactly for ``p < 2 steps``
(hence the first moment is a Hutchinson estimate of ``trace / n``), and the mass of an interval
is, per probe, ``||P v||^2 / n`` for the projector P onto the eigenvectors inside it (exact with
``steps >= n``): unbiased for the fraction of eigenvalues there, with a standard deviation of at
most ``sqrt(2 rank(P)) / n`` per probe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from samtune.sharpness.hvp import HVP, FlatLoss, LossFn, measuring


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights per probe (``[probes, steps]``; each row's weights sum to 1)."""

    nodes: Tensor
    weights: Tensor
    #: Parameters measured: the Hessian's size n.
    n: int

    def moment(self, p: int) -> float:
        """``mean over probes of sum_i w_i theta_i^p``: an unbiased estimate of ``tr(H^p) / n``
        (exact per probe for ``p < 2 steps``)."""
        return float((self.weights * self.nodes.double() ** p).sum(1).mean())

    def mass(self, low: float, high: float) -> float:
        """The estimated fraction of eigenvalues in ``[low, high]`` (mean over probes)."""
        inside = (self.nodes >= low) & (self.nodes <= high)
        return float((self.weights * inside).sum(1).mean())

    def curve(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """The density on ``grid``: each node a Gaussian of standard deviation ``sigma``
        (default 1% of the spectrum's range, as wide as PyHessian's), weighted, averaged over
        probes. Integrates to 1 over a grid that covers the nodes by a few sigma."""
        if sigma is None:
            span = float(self.nodes.max() - self.nodes.min())
            sigma = 0.01 * max(span, 1e-12)
        z = (grid.double()[:, None, None] - self.nodes[None]) / sigma
        gauss = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
        return (gauss * self.weights[None]).sum(2).mean(1)


def _quadrature(hvp: HVP, v: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of ``steps`` Lanczos iterations from ``v``."""
    n = v.numel()
    steps = min(steps, n)
    basis = torch.zeros(steps, n, device=v.device, dtype=v.dtype)
    q, prev = v / v.norm(), torch.zeros_like(v)
    alphas, betas = [], []
    beta = torch.zeros((), device=v.device, dtype=v.dtype)
    for j in range(steps):
        basis[j] = q
        w = hvp(q.unsqueeze(0))[0]
        alpha = torch.dot(w, q)
        w = w - alpha * q - beta * prev
        for _ in range(2):  # full reorthogonalisation: no ghost copies of converged nodes
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = w.norm()
        alphas.append(alpha)
        if j + 1 < steps:
            if float(beta) <= 1e-8 * float(alpha.abs().clamp_min(1e-30)):
                break  # an invariant subspace: the quadrature is already exact
            betas.append(beta)
        prev, q = q, w / beta.clamp_min(1e-30)
    a = torch.stack(alphas).double()
    t = torch.diag(a)
    if len(alphas) > 1:
        b = torch.stack(betas[: len(alphas) - 1]).double()
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    theta, s = torch.linalg.eigh(t)
    return theta, s[0] ** 2


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    probes: int = 4,
    steps: int = 90,
    seed: int = 0,
    batch: int = 512,
    mode: str = "auto",
    params: Sequence[str] | None = None,
) -> SpectralDensity:
    """The Hessian's spectral density of the mean loss on (x, y) by stochastic Lanczos quadrature
    (module docstring): ``probes`` seeded Rademacher probes of ``steps`` products each (PyHessian's
    defaults: 1 probe of 90; more probes, less variance in the mass). Nodes of a probe that finds
    an invariant subspace early are padded with zero weight. Raises ValueError unless
    ``probes >= 1`` and ``steps >= 1``.

    >>> import torch.nn.functional as F
    >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> d = spectral_density(model, F.cross_entropy, x, y, probes=2, steps=8)
    >>> d.nodes.shape, round(float(d.weights.sum()), 6), d.n
    (torch.Size([2, 8]), 2.0, 8)
    """
    if probes < 1 or steps < 1:
        raise ValueError(f"need probes >= 1 and steps >= 1, got probes={probes}, steps={steps}")
    with measuring(model):
        f = FlatLoss(model, loss_fn, params)
        hvp = HVP(f, x, y, batch, mode, probe_batch=1)
        gen = torch.Generator(device=f.w.device).manual_seed(seed)
        n, width = f.w.numel(), min(steps, f.w.numel())
        nodes = torch.zeros(probes, width, dtype=torch.float64)
        weights = torch.zeros(probes, width, dtype=torch.float64)
        for i in range(probes):
            v = torch.randint(0, 2, (n,), generator=gen, device=f.w.device).to(f.w.dtype) * 2 - 1
            theta, w = _quadrature(hvp, v, steps)
            nodes[i, : len(theta)], weights[i, : len(w)] = theta.cpu(), w.cpu()
    return SpectralDensity(nodes, weights, n)

"""Curvature of the loss: the Hessian's top eigenvalues and trace, and the PAC-Bayes sigma.

- ``hessian_top_eig``: the top-k eigenvalues of the Hessian of the loss on the subset (Lanczos with
  full reorthogonalisation, stopped on a residual bound; ``k=1`` reports the largest).
- ``hessian_trace``: Hutch++ (or plain Hutchinson) with Rademacher probes.
- ``pac_bayes_sigma`` (Jiang et al. 2019): the largest sigma whose Gaussian perturbation raises
  the training error by at most ``target`` (0.1), found by bisection.

Hessian-vector products come from `samtune.sharpness.hvp`. The iteration loops keep their scalars
on the device: the only host syncs are Lanczos's convergence tests (every 5 steps on an
accelerator).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from samtune.sharpness.hvp import _HVP, FlatLoss, LossFn, _chunks, _measuring


def _lanczos(hvp: _HVP, n: int, k: int, iters: int, tol: float, gen: torch.Generator, device,
             dtype) -> Tensor:
    """Ritz values (ascending) of the Hessian after at most `iters` Lanczos steps with full
    reorthogonalisation; stops early once the top-k Ritz residuals ``beta_j |s_j|`` (a bound on
    the distance to a true eigenvalue) are below ``tol`` times the Ritz values."""
    iters = min(iters, n)
    q = torch.randn(n, generator=gen, device=device, dtype=dtype)
    q = q / q.norm()
    basis = torch.zeros(iters, n, device=device, dtype=dtype)
    alphas, betas = [], []
    beta = torch.zeros((), device=device, dtype=dtype)
    prev = torch.zeros_like(q)
    check_every = 1 if q.device.type == "cpu" else 5
    for j in range(iters):
        basis[j] = q
        w = hvp(q.unsqueeze(0))[0]
        alpha = torch.dot(w, q)
        w = w - alpha * q - beta * prev
        # Full reorthogonalisation (twice is enough): keeps Ritz values from duplicating.
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = w.norm()
        alphas.append(alpha)
        betas.append(beta)
        prev, q = q, w / beta.clamp_min(1e-30)
        # The only host syncs: a convergence test, every 5 products on an accelerator (a sync
        # there stalls the queue of kernels), after each one on CPU, where every op has already
        # finished when it returns and a product costs far more than the test (on CPU this
        # stops Lanczos up to 4 products sooner).
        if tol > 0 and j + 1 >= k and (j + 1) % check_every == 0 and j + 1 < iters:
            theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas).double())
            residual = beta.double() * s[-1, -k:].abs()
            if bool((residual <= tol * theta[-k:].abs()).all()):
                break
    a, b = torch.stack(alphas), torch.stack(betas)
    # Cut at the first (numerically) zero beta: an invariant subspace was found and later
    # vectors are noise.
    tiny = (b.abs() <= 1e-6 * a.abs().max().clamp_min(1e-30)).nonzero()
    size = int(tiny[0]) + 1 if len(tiny) else len(alphas)
    return torch.linalg.eigvalsh(_tridiagonal(alphas[:size], betas[:size]).double()).to(dtype)


def _tridiagonal(alphas: list[Tensor], betas: list[Tensor]) -> Tensor:
    a, b = torch.stack(alphas), torch.stack(betas[: len(alphas) - 1]) if len(alphas) > 1 else None
    t = torch.diag(a)
    if b is not None:
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t


def hessian_top_eig(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, k: int = 1,
                    iters: int = 40, tol: float = 1e-3, seed: int = 0, batch: int = 512,
                    mode: str = "auto", params: Sequence[str] | None = None,
                    memory_share: float = 1.0) -> list[float]:
    """The k largest (algebraic) Hessian eigenvalues, descending, of the mean loss on (x, y).

    Lanczos from a seeded Gaussian start, at most ``iters`` Hessian-vector products, stopping
    when each of the top k Ritz values is within ``tol`` (relative) of a true eigenvalue
    (``tol=0``: always ``iters`` products). ``mode`` picks the Hessian-vector engine (see
    ``_HVP``: "auto", "graph", "forward", "reverse"; "auto" weighs ``memory_share`` of the free
    memory); the value does not depend on either.
    Raises ValueError unless ``1 <= k <= iters`` and ``tol >= 0``.
    """
    if k < 1 or iters < k or tol < 0:
        raise ValueError(f"need 1 <= k <= iters and tol >= 0, got k={k}, iters={iters}, tol={tol}")
    with _measuring(model):
        f = FlatLoss(model, loss_fn, params)
        hvp = _HVP(f, x, y, batch, mode, probe_batch=1, memory_share=memory_share)
        gen = torch.Generator(device=f.w.device).manual_seed(seed)
        ritz = _lanczos(hvp, f.w.numel(), k, iters, tol, gen, f.w.device, f.w.dtype)
    return [float(v) for v in ritz.flip(0)[:k]]


def hessian_trace(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, probes: int = 24,
                  method: str = "hutchpp", probe_batch: int | None = None, seed: int = 0,
                  batch: int = 512, mode: str = "auto", params: Sequence[str] | None = None,
                  memory_share: float = 1.0) -> float:
    """Trace of the Hessian of the mean loss on (x, y) from ``probes`` Hessian-vector products
    with Rademacher probes: Hutch++ (``"hutchpp"``, Meyer et al. 2021) or plain Hutchinson.

    Hutch++ spends a third of the products on a sketch, a third on tracing the sketch's range
    exactly, and the rest on Hutchinson for the remainder: exact when the sketch spans the space,
    and never worse in variance than Hutchinson by more than the products it spends. With fewer
    than 3 probes it is Hutchinson. Products run ``probe_batch`` at a time (``vmap`` /
    batched backward); the default is one at a time on CPU and 8 on an accelerator. (On CPU a
    batched backward measured slower per product, not faster: ResNet-20 on 128 images, 1.47 s
    per product 8 at a time, 1.14 s 4 at a time, 0.78 s one at a time; the cores are already busy
    with one product's convolutions.) Raises ValueError for ``probes < 1`` or an unknown method.
    """
    if probes < 1 or method not in ("hutchpp", "hutchinson"):
        raise ValueError(f"need probes >= 1 and method 'hutchpp' or 'hutchinson', got "
                         f"probes={probes}, method={method!r}")
    with _measuring(model):
        f = FlatLoss(model, loss_fn, params)
        n = f.w.numel()
        if probe_batch is None:
            probe_batch = 1 if f.w.device.type == "cpu" else 8
        hvp = _HVP(f, x, y, batch, mode, probe_batch=probe_batch, memory_share=memory_share)
        gen = torch.Generator(device=f.w.device).manual_seed(seed)

        def rademacher(count: int) -> Tensor:
            return torch.randint(0, 2, (count, n), generator=gen, device=f.w.device).to(f.w.dtype) * 2 - 1

        if method == "hutchinson" or probes < 3:
            v = rademacher(probes)
            return float((v * hvp(v)).sum(1).mean())
        sketch = min(probes // 3, n)
        q, _ = torch.linalg.qr(hvp(rademacher(sketch)).T)  # [n, sketch], orthonormal columns
        exact = (q.T * hvp(q.T.contiguous())).sum()
        rest = probes - 2 * sketch
        if sketch >= n or rest < 1:
            return float(exact)
        g = rademacher(rest)
        g = g - (g @ q) @ q.T  # project the probes off the sketched range
        return float(exact + (g * hvp(g)).sum(1).mean())


def pac_bayes_sigma(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, target: float = 0.1,
                    samples: int = 8, steps: int = 12, low: float = 1e-5, high: float = 1.0,
                    seed: int = 0, batch: int = 512, params: Sequence[str] | None = None) -> float:
    """Largest sigma with ``E[err(w + N(0, sigma^2 I))] - err(w) <= target`` (Jiang et al. 2019),
    by ``steps`` bisections in log space between ``low`` and ``high``; the error is the
    classification error (argmax of the model's output). Every bisection step uses the same
    ``samples`` noise draws (common random numbers), so the search is monotone. Returns ``low``
    when even ``low`` moves the error by more than ``target``. ``loss_fn`` is unused (the criterion
    is the error); it is accepted so every measure has one signature.
    Raises ValueError unless ``0 < low < high``, ``target > 0``, ``samples >= 1``, ``steps >= 1``.
    """
    if not (0 < low < high) or target <= 0 or samples < 1 or steps < 1:
        raise ValueError(f"need 0 < low < high, target > 0, samples >= 1, steps >= 1; got low={low}, "
                         f"high={high}, target={target}, samples={samples}, steps={steps}")
    with _measuring(model), torch.no_grad():
        f = FlatLoss(model, loss_fn, params)
        parts = _chunks(len(y), batch)
        gen = torch.Generator(device=f.w.device).manual_seed(seed)
        noise = [torch.randn(f.w.shape, generator=gen, device=f.w.device, dtype=f.w.dtype)
                 for _ in range(samples)]

        def error(flat) -> Tensor:
            wrong = sum((functional_call(model, f.unflatten(flat), (x[p],)).argmax(1) != y[p]).sum()
                        for p in parts)
            return wrong / len(y)

        base = error(f.w)
        lo = torch.tensor(math.log(low), device=f.w.device, dtype=torch.float64)
        hi = torch.tensor(math.log(high), device=f.w.device, dtype=torch.float64)
        for _ in range(steps):
            # The bisection decision stays on the device: no host sync per step.
            mid = 0.5 * (lo + hi)
            sigma = mid.exp().to(f.w.dtype)
            rise = torch.stack([error(f.w + sigma * z) for z in noise]).mean() - base
            ok = rise <= target
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return float(lo.exp())

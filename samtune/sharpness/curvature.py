"""Curvature of the loss: the top eigenvalues and trace of its Hessian or of its Gauss-Newton
matrix, and the PAC-Bayes sigma.

- ``hessian_top_eig`` / ``ggn_top_eig``: the top-k eigenvalues on the subset (Lanczos with full
  reorthogonalisation, stopped on a residual bound; ``k=1`` reports the largest).
- ``hessian_trace`` / ``ggn_trace``: Hutch++ (or plain Hutchinson) with Rademacher probes.
- `top_eig_estimate` / `trace_estimate` return the value with its residual bound or standard
  error and the products spent (`samtune.sharpness.estimate.Estimate`).
- ``pac_bayes_sigma`` (Jiang et al. 2019): the largest sigma whose Gaussian perturbation raises
  the training error by at most ``target`` (0.1), found by bisection.

Hessian-vector products come from `samtune.sharpness.hvp`, Gauss-Newton-vector products (the
cross-entropy's only) from `samtune.sharpness.ggn`. The iteration loops keep their scalars
on the device: the only host syncs are Lanczos's convergence tests (every 5 steps on an
accelerator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from samtune.sharpness.estimate import Estimate
from samtune.sharpness.ggn import GGN
from samtune.sharpness.hvp import HVP, FlatLoss, LossFn, chunks, measuring


def _products(
    curvature: str, f: FlatLoss, x: Tensor, y: Tensor, batch: int, mode: str, probe_batch: int, memory_share: float
) -> Callable[[Tensor], Tensor]:
    """The curvature-vector product engine: the Hessian's (`HVP`) or the Gauss-Newton's (`GGN`)."""
    if curvature == "hessian":
        return HVP(f, x, y, batch, mode, probe_batch=probe_batch, memory_share=memory_share)
    if curvature == "ggn":
        return GGN(f, x, y, batch, mode, probe_batch=probe_batch, memory_share=memory_share)
    raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")


def _lanczos(
    hvp: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    iters: int,
    tol: float,
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, float, int]:
    """Ritz values (ascending) of the matrix after at most `iters` Lanczos steps with full
    reorthogonalisation, the largest residual bound ``beta_j |s_j|`` of the top k of them (each
    is that close to a true eigenvalue), and the products spent. Stops early once the top-k
    residuals are below ``tol`` times the Ritz values."""
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
    theta, s = torch.linalg.eigh(_tridiagonal(alphas[:size], betas[:size]).double())
    residual = float((betas[size - 1].double().abs() * s[-1, -k:].abs()).max())
    return theta.to(dtype), residual, len(alphas)


def _tridiagonal(alphas: list[Tensor], betas: list[Tensor]) -> Tensor:
    a, b = torch.stack(alphas), torch.stack(betas[: len(alphas) - 1]) if len(alphas) > 1 else None
    t = torch.diag(a)
    if b is not None:
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t


def top_eig_estimate(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    k: int = 1,
    iters: int = 40,
    tol: float = 1e-3,
    seed: int = 0,
    batch: int = 512,
    mode: str = "auto",
    params: Sequence[str] | None = None,
    memory_share: float = 1.0,
    curvature: str = "hessian",
) -> Estimate[list[float]]:
    """The k largest (algebraic) eigenvalues, descending, of the Hessian (``curvature="hessian"``)
    or the Gauss-Newton matrix (``"ggn"``, cross-entropy only) of the mean loss on (x, y), with
    the Lanczos residual bound and the products spent.

    Lanczos from a seeded Gaussian start, at most ``iters`` products, stopping when each of the
    top k Ritz values is within ``tol`` (relative) of a true eigenvalue (``tol=0``: always
    ``iters`` products). ``mode`` picks the product engine (``HVP``: "auto", "graph", "forward",
    "reverse"; ``GGN``: "auto", "graph", "chunk"; "auto" weighs ``memory_share`` of the free
    memory); the value does not depend on either.
    Raises ValueError unless ``1 <= k <= iters`` and ``tol >= 0``.

    >>> import torch.nn.functional as F
    >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> est = top_eig_estimate(model, F.cross_entropy, x, y, curvature="ggn")
    >>> est.products <= 8 and est.residual <= 1e-3 * est.value[0]
    True
    """
    if k < 1 or iters < k or tol < 0:
        raise ValueError(f"need 1 <= k <= iters and tol >= 0, got k={k}, iters={iters}, tol={tol}")
    with measuring(model):
        f = FlatLoss(model, loss_fn, params)
        products = _products(curvature, f, x, y, batch, mode, 1, memory_share)
        gen = torch.Generator(device=f.w.device).manual_seed(seed)
        ritz, residual, used = _lanczos(products, f.w.numel(), k, iters, tol, gen, f.w.device, f.w.dtype)
    return Estimate([float(v) for v in ritz.flip(0)[:k]], products=used, residual=residual)


def hessian_top_eig(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, **settings: Any) -> list[float]:
    """The k largest Hessian eigenvalues, descending (`top_eig_estimate`'s settings)."""
    return top_eig_estimate(model, loss_fn, x, y, curvature="hessian", **settings).value


def ggn_top_eig(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, **settings: Any) -> list[float]:
    """The k largest eigenvalues of the Gauss-Newton matrix of the mean cross-entropy,
    descending (`top_eig_estimate`'s settings); raises ValueError for another loss."""
    return top_eig_estimate(model, loss_fn, x, y, curvature="ggn", **settings).value


def _rademacher(gen: torch.Generator, count: int, like: Tensor) -> Tensor:
    return torch.randint(0, 2, (count, like.numel()), generator=gen, device=like.device).to(like.dtype) * 2 - 1


class _Remainder:
    """Hutchinson samples ``g^T A g`` of Rademacher probes projected off the sketched range."""

    def __init__(self, apply: Callable[[Tensor], Tensor], q: Tensor | None, gen: torch.Generator, w: Tensor):
        self.apply, self.q, self.gen, self.w = apply, q, gen, w
        self.samples = torch.zeros(0, device=w.device, dtype=w.dtype)

    def draw(self, count: int) -> None:
        g = _rademacher(self.gen, count, self.w)
        if self.q is not None:
            g = g - (g @ self.q) @ self.q.T  # project the probes off the sketched range
        self.samples = torch.cat([self.samples, (g * self.apply(g)).sum(1)])

    @property
    def stderr(self) -> float | None:
        m = len(self.samples)
        return float(self.samples.std() / math.sqrt(m)) if m >= 2 else None


#: Hutchinson samples drawn before a relative standard error target is first checked: a
#: standard deviation from fewer samples is too rough to stop on.
MIN_SAMPLES = 10


def _hutchpp(
    apply: Callable[[Tensor], Tensor],
    w: Tensor,
    probes: int,
    method: str,
    sketch: int | None,
    rel_se: float | None,
    block: int,
    gen: torch.Generator,
) -> Estimate[float]:
    """Hutch++ (or Hutchinson, ``sketch=0``) on the products ``apply``; see `trace_estimate`."""
    n = w.numel()
    sketch = 0 if method == "hutchinson" or probes < 3 else min(probes // 3 if sketch is None else sketch, n)
    exact, q = 0.0, None
    if sketch:
        q, _ = torch.linalg.qr(apply(_rademacher(gen, sketch, w)).T)  # [n, sketch], orthonormal
        exact = (q.T * apply(q.T.contiguous())).sum()
    rest = probes - 2 * sketch
    if sketch >= n or rest < 1:
        return Estimate(float(exact), products=2 * sketch, stderr=0.0 if sketch >= n else None)
    remainder = _Remainder(apply, q, gen, w)
    if rel_se is None:
        remainder.draw(rest)
    else:
        remainder.draw(min(rest, max(MIN_SAMPLES, block)))
        while len(remainder.samples) < rest and not _within(remainder, exact, rel_se):
            remainder.draw(min(block, rest - len(remainder.samples)))
    value = float(exact + remainder.samples.mean())
    return Estimate(value, products=2 * sketch + len(remainder.samples), stderr=remainder.stderr)


def _within(remainder: _Remainder, exact: float | Tensor, rel_se: float) -> bool:
    se = remainder.stderr
    return se is not None and se <= rel_se * abs(float(exact + remainder.samples.mean()))


def trace_estimate(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    probes: int = 24,
    method: str = "hutchpp",
    probe_batch: int | None = None,
    seed: int = 0,
    batch: int = 512,
    mode: str = "auto",
    params: Sequence[str] | None = None,
    memory_share: float = 1.0,
    sketch: int | None = None,
    rel_se: float | None = None,
    curvature: str = "hessian",
) -> Estimate[float]:
    """Trace of the Hessian (``curvature="hessian"``) or of the Gauss-Newton matrix (``"ggn"``,
    cross-entropy only) of the mean loss on (x, y), from at most ``probes`` products with
    Rademacher probes: Hutch++ (``"hutchpp"``, Meyer et al. 2021) or plain Hutchinson; with its
    standard error and the products spent.

    Hutch++ spends ``sketch`` products (default a third of ``probes``) on a sketch, as many on
    tracing the sketch's range exactly, and the rest on Hutchinson for the remainder: exact when
    the sketch spans the space, and never worse in variance than Hutchinson by more than the
    products it spends. With fewer than 3 probes it is Hutchinson. The standard error is the
    sample standard deviation of the Hutchinson samples over the square root of their number:
    the exact part adds none, as for every sketch the exact part plus the remainder's mean is
    the trace (its expectation over the probes), so the spread of the estimate over seeds is
    the spread of the Hutchinson part (none: the sketch spans the space, 0; fewer than 2
    samples, None). ``rel_se``: stop drawing remainder probes once the standard error is within
    ``rel_se`` of the estimate (checked from `MIN_SAMPLES` samples on), ``probes`` then a cap.

    Products run ``probe_batch`` at a time (``vmap`` / batched backward); the default is one at
    a time on CPU and 8 on an accelerator. (On CPU a batched backward measured slower per
    product, not faster: ResNet-20 on 128 images, 1.47 s per product 8 at a time, 1.14 s 4 at a
    time, 0.78 s one at a time; the cores are already busy with one product's convolutions.)
    Raises ValueError for ``probes < 1``, an unknown method or ``rel_se <= 0``.

    >>> import torch.nn.functional as F
    >>> model, x, y = nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> est = trace_estimate(model, F.cross_entropy, x, y, probes=6, method="hutchinson")
    >>> est.products, est.stderr > 0
    (6, True)
    """
    if probes < 1 or method not in ("hutchpp", "hutchinson") or (rel_se is not None and rel_se <= 0):
        raise ValueError(
            f"need probes >= 1, method 'hutchpp' or 'hutchinson' and rel_se > 0 or None, "
            f"got probes={probes}, method={method!r}, rel_se={rel_se}"
        )
    with measuring(model):
        f = FlatLoss(model, loss_fn, params)
        if probe_batch is None:
            probe_batch = 1 if f.w.device.type == "cpu" else 8
        products = _products(curvature, f, x, y, batch, mode, probe_batch, memory_share)
        gen = torch.Generator(device=f.w.device).manual_seed(seed)
        return _hutchpp(products, f.w, probes, method, sketch, rel_se, probe_batch, gen)


def hessian_trace(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, **settings: Any) -> float:
    """Trace of the Hessian of the mean loss (`trace_estimate`'s settings)."""
    return trace_estimate(model, loss_fn, x, y, curvature="hessian", **settings).value


def ggn_trace(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, **settings: Any) -> float:
    """Trace of the Gauss-Newton matrix of the mean cross-entropy (`trace_estimate`'s
    settings); raises ValueError for another loss."""
    return trace_estimate(model, loss_fn, x, y, curvature="ggn", **settings).value


def pac_bayes_sigma(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    target: float = 0.1,
    samples: int = 8,
    steps: int = 12,
    low: float = 1e-5,
    high: float = 1.0,
    seed: int = 0,
    batch: int = 512,
    params: Sequence[str] | None = None,
) -> float:
    """Largest sigma with ``E[err(w + N(0, sigma^2 I))] - err(w) <= target`` (Jiang et al. 2019),
    by ``steps`` bisections in log space between ``low`` and ``high``; the error is the
    classification error (argmax of the model's output). Every bisection step uses the same
    ``samples`` noise draws (common random numbers), so the search is monotone. Returns ``low``
    when even ``low`` moves the error by more than ``target``. ``loss_fn`` is unused (the criterion
    is the error); it is accepted so every measure has one signature.
    Raises ValueError unless ``0 < low < high``, ``target > 0``, ``samples >= 1``, ``steps >= 1``.
    """
    if not (0 < low < high) or target <= 0 or samples < 1 or steps < 1:
        raise ValueError(
            f"need 0 < low < high, target > 0, samples >= 1, steps >= 1; got low={low}, "
            f"high={high}, target={target}, samples={samples}, steps={steps}"
        )
    with measuring(model), torch.no_grad():
        f = FlatLoss(model, loss_fn, params)
        parts = chunks(len(y), batch)
        gen = torch.Generator(device=f.w.device).manual_seed(seed)
        noise = [torch.randn(f.w.shape, generator=gen, device=f.w.device, dtype=f.w.dtype) for _ in range(samples)]

        def error(flat: Tensor) -> Tensor:
            wrong = sum((functional_call(model, f.unflatten(flat), (x[p],)).argmax(1) != y[p]).sum() for p in parts)
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

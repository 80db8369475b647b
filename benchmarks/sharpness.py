"""Hessian top eigenvalue and trace: samtune.sharpness against the PyHessian algorithm.

Baseline, measured in this run on the same model, examples and thread count: PyHessian
(Yao et al. 2020), the tool sharpness studies usually cite. By default it is PyHessian's
algorithm as the package writes it, reproduced below so the benchmark needs nothing else:
one forward and ``backward(create_graph=True)`` on the whole batch, then per iteration one
double-backward Hessian-vector product over per-parameter lists with an ``.item()`` sync;
power iteration for the top eigenvalue and Hutchinson for the trace, both stopping when the
estimate moves by less than ``tol`` (relative, 1e-3) or after 100 products. With ``--pyhessian``
the installed ``pyhessian`` package itself is the baseline (``pip install pyhessian``; it runs
unchanged on this torch).

samtune: Lanczos stopped when the Ritz residual bound is below the same ``tol``, and Hutch++
with ``--probes`` products (default 24), probes batched. The function is the same for both:
BatchNorm normalises by the batch statistics of all examples at once (the model's BatchNorm
layers stop tracking running statistics, so PyHessian's ``model.eval()`` keeps batch statistics
too), dropout absent. The model is a CIFAR ResNet-20 after ``--warmup`` SGD steps on the examples.
Data: CIFAR-10 training images when ``load_dataset("cifar10", --data-root)`` finds them, else
seeded random images (said in the output).

Prints both tools' values and times, the reference's own standard error of the trace, and ends
with ``ratios: top_eig_speedup=X.X trace_speedup=Y.Y rel_diff=Z.ZZZ`` (rel_diff: top
eigenvalue; the trace's relative difference and the reference's relative standard error follow
on the same line). Target: speedups >= 2 at rel_diff < 0.01.

    python benchmarks/sharpness.py [--examples 1024] [--threads 2] [--probes 24] [--pyhessian]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from samtune.models import build_model
from samtune.sharpness import hessian_top_eig, hessian_trace


# ------------------------------------------------------------------------------ the baseline
def _group_product(xs, ys):
    return sum(torch.sum(x * y) for x, y in zip(xs, ys))


def _normalization(v):
    s = _group_product(v, v) ** 0.5
    s = s.cpu().item()
    return [vi / (s + 1e-6) for vi in v]


class PyHessianReference:
    """PyHessian 0.1's ``hessian`` class for a single batch: eigenvalues() and trace()."""

    def __init__(self, model: nn.Module, criterion, x, y):
        self.model = model.eval()
        loss = criterion(model(x), y)
        loss.backward(create_graph=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [p.grad + 0.0 for p in self.params]

    def _hvp(self, v):
        return torch.autograd.grad(self.grads, self.params, grad_outputs=v, only_inputs=True,
                                   retain_graph=True)

    def eigenvalue(self, max_iter: int = 100, tol: float = 1e-3) -> tuple[float, int]:
        v = _normalization([torch.randn(p.size()) for p in self.params])
        eigenvalue = None
        for i in range(max_iter):
            self.model.zero_grad()
            hv = self._hvp(v)
            tmp = _group_product(hv, v).cpu().item()
            v = _normalization(hv)
            if eigenvalue is not None and abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < tol:
                return eigenvalue, i + 1
            eigenvalue = tmp
        return eigenvalue, max_iter

    def trace(self, max_iter: int = 100, tol: float = 1e-3) -> list[float]:
        vhv, trace = [], 0.0
        for _ in range(max_iter):
            self.model.zero_grad()
            v = [torch.randint_like(p, high=2) for p in self.params]
            for vi in v:
                vi[vi == 0] = -1
            vhv.append(_group_product(self._hvp(v), v).cpu().item())
            mean = sum(vhv) / len(vhv)
            if abs(mean - trace) / (trace + 1e-6) < tol:
                return vhv
            trace = mean
        return vhv

    def release(self, model: nn.Module) -> None:
        self.grads = None
        model.zero_grad(set_to_none=True)


def reference_tool(model, x, y, tol, use_package):
    """(top eigenvalue, products, seconds), (trace samples, seconds) from the baseline."""
    if use_package:
        from pyhessian import hessian  # the real package, when asked for

        def build():
            return hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)

        def top(h):
            values, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
            return values[0], -1

        def trace(h):
            return h.trace(maxIter=100, tol=tol)
    else:
        def build():
            return PyHessianReference(model, F.cross_entropy, x, y)

        def top(h):
            return h.eigenvalue(100, tol)

        def trace(h):
            return h.trace(100, tol)

    # Each figure includes building the batch's graph, as a user calling either method pays it.
    torch.manual_seed(0)
    start = time.perf_counter()
    h = build()
    value, products = top(h)
    top_s = time.perf_counter() - start
    del h
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    start = time.perf_counter()
    h = build()
    samples = trace(h)
    trace_s = time.perf_counter() - start
    del h
    model.zero_grad(set_to_none=True)
    return (value, products, top_s), (samples, trace_s)


# ------------------------------------------------------------------------------ setup
def examples(n: int, data_root: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    os.environ.setdefault("SAMTUNE_OFFLINE", "1")  # a benchmark never waits on a download
    try:
        from samtune.data import load_dataset, to_float
        data = load_dataset("cifar10", data_root)
        idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[:n]
        return to_float(data.train_x[idx], data.mean, data.std), data.train_y[idx], "CIFAR-10 train"
    except Exception as err:  # any missing-data error: fall back to seeded random images
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        return x, y, f"random images (CIFAR-10 not loaded: {type(err).__name__})"


def warmed_up_model(name: str, x, y, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 10, (3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(steps):
        part = slice((i * 128) % len(y), (i * 128) % len(y) + 128)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    # Batch statistics in train and eval mode alike: one function for both tools.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--probes", type=int, default=24, help="Hutch++ products for samtune's trace")
    parser.add_argument("--warmup", type=int, default=16, help="SGD steps before measuring")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--pyhessian", action="store_true", help="use the installed pyhessian package")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x, y, source = examples(args.examples, args.data_root)
    model = warmed_up_model(args.model, x, y, args.warmup)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({n_params} parameters), examples: {len(y)} ({source}), "
          f"threads: {args.threads}, tol: {args.tol}")
    print(f"baseline: {'pyhessian package' if args.pyhessian else 'PyHessian algorithm (in this file)'}")

    (ref_top, ref_products, ref_top_s), (ref_vhv, ref_trace_s) = reference_tool(
        model, x, y, args.tol, args.pyhessian)
    ref_trace = sum(ref_vhv) / len(ref_vhv)
    ref_se = (math.sqrt(sum((v - ref_trace) ** 2 for v in ref_vhv) / (len(ref_vhv) - 1) / len(ref_vhv))
              if len(ref_vhv) > 1 else float("nan"))
    print(f"reference: top_eig={ref_top:.5f} ({ref_products} products, {ref_top_s:.1f} s) "
          f"trace={ref_trace:.3f} +- {ref_se:.3f} ({len(ref_vhv)} probes, {ref_trace_s:.1f} s)")

    start = time.perf_counter()
    top = hessian_top_eig(model, F.cross_entropy, x, y, tol=args.tol, batch=len(y))[0]
    top_s = time.perf_counter() - start
    start = time.perf_counter()
    trace = hessian_trace(model, F.cross_entropy, x, y, probes=args.probes, batch=len(y))
    trace_s = time.perf_counter() - start
    print(f"samtune:   top_eig={top:.5f} ({top_s:.1f} s) trace={trace:.3f} "
          f"({args.probes} probes, Hutch++, {trace_s:.1f} s)")

    rel_diff = abs(top - ref_top) / abs(ref_top)
    trace_rel = abs(trace - ref_trace) / abs(ref_trace)
    print(f"ratios: top_eig_speedup={ref_top_s / top_s:.1f} trace_speedup={ref_trace_s / trace_s:.1f} "
          f"rel_diff={rel_diff:.3f} trace_rel_diff={trace_rel:.3f} reference_trace_rel_se={ref_se / abs(ref_trace):.3f}")


if __name__ == "__main__":
    main()

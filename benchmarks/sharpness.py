"""Hessian top eigenvalue and trace: samtune.sharpness against the PyHessian algorithm.

Baseline, measured in this run on the same model, examples and thread count: PyHessian
(Yao et al. 2020), the tool sharpness studies usually cite. By default it is PyHessian's
algorithm as the package writes it, reproduced below so the benchmark needs nothing else:
one forward and ``backward(create_graph=True)`` on the whole batch, then per iteration one
double-backward Hessian-vector product over per-parameter lists with an ``.item()`` sync;
power iteration for the top eigenvalue and Hutchinson for the trace, both stopping when the
estimate moves by less than ``tol`` (relative, 1e-3) or after ``--max-iter`` products (PyHessian's
``maxIter``). With ``--pyhessian`` the ``pyhessian`` package from PyPI (0.1) itself is the
baseline. It is not a dependency of samtune: install it apart from the project's environment,
without its dependencies (it needs only torch and numpy, which are there) and put it on the path::

    pip install --no-deps --target /tmp/pyhessian pyhessian
    PYTHONPATH=/tmp/pyhessian python benchmarks/sharpness.py --pyhessian

It imports and runs unchanged on the project's torch (checked with 2.14: its single-batch
``hessian.eigenvalues`` and ``hessian.trace``, with the same values as the reproduction for the
same seeds); its products are counted by wrapping its ``hessian_vector_product``.

samtune: Lanczos stopped when the Ritz residual bound is below the same ``tol``, and Hutch++
with ``--probes`` products (default 24; batched on an accelerator, one at a time on CPU). The
function is the same for both: BatchNorm normalises by the batch statistics of all examples at
once (the model's BatchNorm layers stop tracking running statistics, so PyHessian's
``model.eval()`` keeps batch statistics too), dropout absent. The model is a CIFAR ResNet-20
after ``--warmup`` SGD steps on the examples.
Data: CIFAR-10 training images from ``load_dataset("cifar10", --data-root)``; ``--data-root``
defaults to the shared JPEG tarball ``../shared/data/cifar10-jpeg.tar.gz`` next to the project
where it exists. Where no CIFAR-10 can be loaded, seeded random images (said in the output).

Prints both tools' values, products and times, then
``trace_rel_diff=... reference_trace_rel_se=...`` (the traces' relative difference, the
reference's relative standard error), and ends with exactly
``ratios: top_eig_speedup=X.X trace_speedup=Y.Y rel_diff=Z.ZZZ`` (rel_diff: top eigenvalue).
Target: speedups >= 2 at rel_diff < 0.01.

Runtime is the number of Hessian-vector products times their cost, linear in ``--examples``:
on 2 threads a ResNet-20 product measured 0.8 s on 128 images and 1.6 s on 256, so about 6 s
on 1,024 (several times that when other work shares the cores). In a 32-image smoke run both
top eigenvalues took 10-11 products and the reference's trace 12 (it stops by chance on
``tol``), with samtune's 24 trace probes about 57 in all; the caps ``--max-iter`` (30 per
reference estimate, against PyHessian's own 100) and ``--iters`` (40, samtune's Lanczos) bound a
run at 124 products, about 13 minutes at 6 s each. The output says when a reference estimate
reached the cap. A smoke run:

    python benchmarks/sharpness.py --examples 64 --model mlp

    python benchmarks/sharpness.py [--examples 1024] [--threads 2] [--probes 24] [--max-iter 30]
                                   [--iters 40] [--pyhessian]
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samtune import sharpness
from samtune.models.zoo import build_model
from samtune.sharpness.curvature import hessian_top_eig, hessian_trace

# The CIFAR-10 copy the project keeps beside it (../shared/data from the project's root).
SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


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


def _pyhessian_package():
    """The installed pyhessian package, with a counter on its Hessian-vector products."""
    import importlib

    try:
        # The module, not the class: the package's __init__ rebinds `pyhessian.hessian` to it.
        module = importlib.import_module("pyhessian.hessian")
    except ImportError as err:
        raise SystemExit("--pyhessian: the pyhessian package is not importable; install it apart "
                         "from the project: pip install --no-deps --target /tmp/pyhessian "
                         "pyhessian, then run with PYTHONPATH=/tmp/pyhessian") from err
    counter = {"products": 0}
    product = module.hessian_vector_product
    if not getattr(product, "counted", False):
        def counted(*args, **kwargs):
            counter["products"] += 1
            return product(*args, **kwargs)
        counted.counted = True
        counted.counter = counter
        module.hessian_vector_product = counted
    return module.hessian, module.hessian_vector_product.counter


def reference_tool(model, x, y, tol, max_iter, use_package):
    """(top eigenvalue, products, seconds), (trace samples, seconds) from the baseline."""
    if use_package:
        hessian, counter = _pyhessian_package()

        def build():
            return hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)

        def top(h):
            counter["products"] = 0
            values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
            return values[0], counter["products"]

        def trace(h):
            return h.trace(maxIter=max_iter, tol=tol)
    else:
        def build():
            return PyHessianReference(model, F.cross_entropy, x, y)

        def top(h):
            return h.eigenvalue(max_iter, tol)

        def trace(h):
            return h.trace(max_iter, tol)

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
        from samtune.data.load import load_dataset
        from samtune.data.transforms import to_float
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
    parser.add_argument("--iters", type=int, default=40, help="samtune's Lanczos cap (products)")
    parser.add_argument("--max-iter", type=int, default=30,
                        help="the reference's cap on products per estimate (PyHessian's maxIter)")
    parser.add_argument("--data-root",
                        default=str(SHARED_CIFAR10) if SHARED_CIFAR10.exists() else None,
                        help="CIFAR-10 folder or tarball (default: the shared tarball, if present)")
    parser.add_argument("--pyhessian", action="store_true",
                        help="baseline: the pyhessian package, on PYTHONPATH (see the module doc)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x, y, source = examples(args.examples, args.data_root)
    model = warmed_up_model(args.model, x, y, args.warmup)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({n_params} parameters), examples: {len(y)} ({source}), "
          f"threads: {args.threads}, tol: {args.tol}")
    print(f"baseline: {'pyhessian package' if args.pyhessian else 'PyHessian algorithm (in this file)'}")

    (ref_top, ref_products, ref_top_s), (ref_vhv, ref_trace_s) = reference_tool(
        model, x, y, args.tol, args.max_iter, args.pyhessian)
    ref_trace = sum(ref_vhv) / len(ref_vhv)
    ref_se = (math.sqrt(sum((v - ref_trace) ** 2 for v in ref_vhv) / (len(ref_vhv) - 1) / len(ref_vhv))
              if len(ref_vhv) > 1 else float("nan"))
    capped = [what for what, n in (("top_eig", ref_products), ("trace", len(ref_vhv)))
              if n >= args.max_iter]
    print(f"reference: top_eig={ref_top:.5f} ({ref_products} products, {ref_top_s:.1f} s) "
          f"trace={ref_trace:.3f} +- {ref_se:.3f} ({len(ref_vhv)} probes, {ref_trace_s:.1f} s)"
          + (f"; reached --max-iter {args.max_iter} (tol may not be met): {', '.join(capped)}"
             if capped else ""))

    products = _count_products()
    start = time.perf_counter()
    top = hessian_top_eig(model, F.cross_entropy, x, y, iters=args.iters, tol=args.tol,
                          batch=len(y))[0]
    top_s = time.perf_counter() - start
    top_products = products["n"]
    start = time.perf_counter()
    trace = hessian_trace(model, F.cross_entropy, x, y, probes=args.probes, batch=len(y))
    trace_s = time.perf_counter() - start
    print(f"samtune:   top_eig={top:.5f} ({top_products} products, {top_s:.1f} s) "
          f"trace={trace:.3f} ({products['n'] - top_products} probes, Hutch++, {trace_s:.1f} s)")

    rel_diff = abs(top - ref_top) / abs(ref_top)
    trace_rel = abs(trace - ref_trace) / abs(ref_trace)
    print(f"trace_rel_diff={trace_rel:.3f} reference_trace_rel_se={ref_se / abs(ref_trace):.3f}")
    # The last line, exactly in this format: scripts read it.
    print(f"ratios: top_eig_speedup={ref_top_s / top_s:.1f} trace_speedup={ref_trace_s / trace_s:.1f} "
          f"rel_diff={rel_diff:.3f}")


def _count_products() -> dict[str, int]:
    """Count samtune's Hessian-vector products (rows of the probe blocks), for the printout."""
    counter = {"n": 0}
    call = sharpness._HVP.__call__

    def counted(self, vs):
        counter["n"] += len(vs)
        return call(self, vs)

    sharpness._HVP.__call__ = counted
    return counter


if __name__ == "__main__":
    main()

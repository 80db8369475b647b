"""Hessian top eigenvalue and trace at equal accuracy: samtune.sharpness against PyHessian's algorithms.

What is compared is the time to reach the same accuracy, not each tool's own stopping rule:

- Top eigenvalue, target ``--eig-error`` (1e-3) relative error against a converged reference:
  Lanczos run first to a residual bound of ``--reference-tol`` (1e-6, relative, seed 1234).
  samtune's Lanczos (seed 0) stops on its own residual bound (``tol`` = the target), an
  achievable rule; its error against the reference is printed, and so is the product at which
  it first came within the target (Rayleigh-Ritz on the vectors it had multiplied). The
  baseline, power iteration as PyHessian writes it, is given the reference and stopped the
  moment it is within the target (an oracle: the most favourable stop it could have), or at
  ``--max-iter`` products, said in the output; a capped run's speed-up is a lower bound (``>=``).
- Trace, target ``--trace-rel-se`` (2%) relative standard error, from each estimator's own
  variance estimate: Hutchinson as PyHessian writes it (one Rademacher probe per product)
  against samtune's Hutch++ (``--sketch`` products on a sketch, as many to trace it exactly,
  then projected Hutchinson probes), each drawing probes until its standard error is within the
  target (checked from 10 samples on) or ``--max-probes``. With ``--repeats R`` both are rerun
  with R more seeds and the spread of the R + 1 values is printed beside the mean reported
  standard error (the check that the standard errors are honest; R + 1 times the trace's cost).
- Products: one Hessian-vector product and one Gauss-Newton-vector product
  (`samtune.sharpness.ggn`) on the same examples, graphs kept, median of 3 after the build:
  ``ggn_product/hvp_product=...``.

Baseline: by default PyHessian's algorithm as the ``pyhessian`` package (0.1) writes it,
reproduced below: one forward and ``backward(create_graph=True)`` on the whole batch, then per
iteration one double-backward Hessian-vector product over per-parameter lists with an ``.item()``
sync. With ``--pyhessian`` the package itself (its ``hessian.eigenvalues`` and ``hessian.trace``,
products counted and stopped on the same targets by wrapping its ``hessian_vector_product``).
It is not a dependency of samtune: install it apart, without its dependencies::

    pip install --no-deps --target /tmp/pyhessian pyhessian
    PYTHONPATH=/tmp/pyhessian python benchmarks/sharpness.py --pyhessian

Both tools measure one function: BatchNorm normalises by the batch statistics of all examples at
once (the model's BatchNorm layers stop tracking running statistics, so PyHessian's
``model.eval()`` keeps batch statistics too), no dropout. The model is a CIFAR ResNet-20 after
``--warmup`` SGD steps on the examples. Data: ``--examples`` CIFAR-10 training images (default
256, not the 1,024 a trial measures on: a ResNet-20 Hessian-vector product costs 13-16 s on
1,024 images on 2 CPU threads, about a quarter of that on 256, and a run takes a few hundred
products) from ``load_dataset("cifar10", --data-root)``, by default the shared tarball
``../shared/data/cifar10-jpeg.tar.gz`` next to the project; seeded random images where no
CIFAR-10 can be loaded (said in the output).

Ends with exactly ``ratios: top_eig_speedup=X.X trace_speedup=Y.Y rel_diff=Z.ZZZZ`` (speed-ups in
seconds at equal accuracy, baseline over samtune, ``>=`` before a lower bound; rel_diff: the two
top eigenvalues' relative difference). Target: both speed-ups at least 2. A smoke run:

    python benchmarks/sharpness.py --examples 64 --model mlp

    python benchmarks/sharpness.py [--examples 256] [--threads 2] [--max-iter 100]
                                   [--max-probes 400] [--sketch 10] [--repeats 0] [--pyhessian]
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samtune.data.load import load_dataset
from samtune.data.transforms import to_float
from samtune.models.zoo import build_model
from samtune.sharpness.curvature import MIN_SAMPLES, top_eig_estimate, trace_estimate
from samtune.sharpness.ggn import GGN
from samtune.sharpness.hvp import HVP, FlatLoss, measuring

# The CIFAR-10 copy the project keeps beside it (../shared/data from the project's root).
SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


class Reached(Exception):
    """Raised inside a baseline's loop once its target is met: it stops there."""


def rel_se(samples: list[float]) -> float:
    """Relative standard error of the mean of ``samples`` (inf under 2 samples)."""
    if len(samples) < 2:
        return math.inf
    mean = statistics.fmean(samples)
    return statistics.stdev(samples) / math.sqrt(len(samples)) / abs(mean) if mean else math.inf


class Target:
    """The accuracy targets, checked on a running estimate; counts products and their seconds."""

    def __init__(self, reference: float | None, eig_error: float, trace_rel_se: float, cap: int):
        self.reference, self.eig_error, self.trace_rel_se, self.cap = reference, eig_error, trace_rel_se, cap
        self.start, self.products, self.values, self.seconds = time.perf_counter(), 0, [], 0.0

    def _count(self, value: float) -> None:
        # The seconds up to this product: the stopping rule's own work is not counted.
        self.seconds = time.perf_counter() - self.start
        self.products += 1
        self.values.append(value)

    def eigenvalue(self, value: float) -> bool:
        self._count(value)
        return abs(value - self.reference) <= self.eig_error * abs(self.reference) or self.products >= self.cap

    def trace_sample(self, value: float) -> bool:
        self._count(value)
        return (
            len(self.values) >= MIN_SAMPLES and rel_se(self.values) <= self.trace_rel_se
        ) or self.products >= self.cap


# ------------------------------------------------------------------------------ the baseline
def _group_product(xs, ys):
    return sum(torch.sum(x * y) for x, y in zip(xs, ys))


def _normalization(v):
    s = _group_product(v, v) ** 0.5
    s = s.cpu().item()
    return [vi / (s + 1e-6) for vi in v]


class PyHessianReference:
    """PyHessian 0.1's ``hessian`` class for a single batch: power iteration and Hutchinson, each
    stopped by a `Target` instead of its own relative-change rule."""

    def __init__(self, model: nn.Module, x, y):
        self.model = model.eval()
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [p.grad + 0.0 for p in self.params]

    def _hvp(self, v):
        return torch.autograd.grad(self.grads, self.params, grad_outputs=v, only_inputs=True, retain_graph=True)

    def eigenvalue(self, target: Target) -> float:
        v = _normalization([torch.randn(p.size()) for p in self.params])
        while True:
            self.model.zero_grad()
            hv = self._hvp(v)
            value = _group_product(hv, v).cpu().item()
            v = _normalization(hv)
            if target.eigenvalue(value):
                return value

    def trace(self, target: Target) -> None:
        while True:
            self.model.zero_grad()
            v = [torch.randint_like(p, high=2) for p in self.params]
            for vi in v:
                vi[vi == 0] = -1
            if target.trace_sample(_group_product(self._hvp(v), v).cpu().item()):
                return


def _pyhessian_package(target_of):
    """The pyhessian package's ``hessian`` class, its products reported to ``target_of()``."""
    try:
        # The module, not the class: the package's __init__ rebinds `pyhessian.hessian` to it.
        module = importlib.import_module("pyhessian.hessian")
    except ImportError as err:
        raise SystemExit(
            "--pyhessian: the pyhessian package is not importable; install it apart "
            "from the project: pip install --no-deps --target /tmp/pyhessian "
            "pyhessian, then run with PYTHONPATH=/tmp/pyhessian"
        ) from err
    product = getattr(module.hessian_vector_product, "wrapped", module.hessian_vector_product)

    def counted(grads, params, v):
        hv = product(grads, params, v)
        target, kind = target_of()
        # v is the normalised iterate (eigenvalues) or the Rademacher probe (trace): v.Hv is
        # the package's own estimate or sample.
        value = float(sum(torch.sum(a * b) for a, b in zip(hv, v)))
        if (target.eigenvalue if kind == "eig" else target.trace_sample)(value):
            raise Reached
        return hv

    counted.wrapped = product
    module.hessian_vector_product = counted
    return module.hessian


def baseline_top(model, x, y, target: Target, package: bool) -> float:
    torch.manual_seed(0)
    if package:
        hessian = _pyhessian_package(lambda: (target, "eig"))
        try:
            hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(maxIter=10**6, tol=0.0, top_n=1)
        except Reached:
            pass
        value = target.values[-1]
    else:
        value = PyHessianReference(model, x, y).eigenvalue(target)
    model.zero_grad(set_to_none=True)
    return value


def baseline_trace(model, x, y, target: Target, package: bool) -> None:
    torch.manual_seed(1)
    if package:
        hessian = _pyhessian_package(lambda: (target, "trace"))
        try:
            hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace(maxIter=10**6, tol=0.0)
        except Reached:
            pass
    else:
        PyHessianReference(model, x, y).trace(target)
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ samtune
class Recorded:
    """Wraps `HVP.__call__`: each product's vector, result and completion time."""

    def __enter__(self):
        self.vs, self.hvs, self.stamps, self.start = [], [], [], time.perf_counter()
        self.call = HVP.__call__
        recorder = self

        def recording(engine, vs):
            out = recorder.call(engine, vs)
            recorder.vs.append(vs.detach().clone())
            recorder.hvs.append(out.detach().clone())
            recorder.stamps.extend([time.perf_counter() - recorder.start] * len(vs))
            return out

        HVP.__call__ = recording
        return self

    def __exit__(self, *exc):
        HVP.__call__ = self.call

    def first_within(self, reference: float, error: float) -> tuple[int, float] | None:
        """(products, seconds) at which the Rayleigh-Ritz top value of the vectors multiplied so
        far (Lanczos's own Ritz value, its basis being orthonormal) came within ``error``."""
        v, hv = torch.cat(self.vs).double(), torch.cat(self.hvs).double()
        for j in range(1, len(v) + 1):
            m = v[:j] @ hv[:j].T
            top = float(torch.linalg.eigvalsh(0.5 * (m + m.T))[-1])
            if abs(top - reference) <= error * abs(reference):
                return j, self.stamps[j - 1]
        return None


def samtune_top(model, x, y, reference: float, args) -> dict:
    with Recorded() as rec:
        start = time.perf_counter()
        est = top_eig_estimate(model, F.cross_entropy, x, y, iters=args.iters, tol=args.eig_error, batch=len(y), seed=0)
        seconds = time.perf_counter() - start
    return {
        "value": est.value[0],
        "products": est.products,
        "seconds": seconds,
        "residual": est.residual,
        "first": rec.first_within(reference, args.eig_error),
    }


def samtune_trace(model, x, y, args, seed: int = 0):
    start = time.perf_counter()
    est = trace_estimate(
        model,
        F.cross_entropy,
        x,
        y,
        probes=args.max_probes,
        sketch=args.sketch,
        rel_se=args.trace_rel_se,
        batch=len(y),
        seed=seed,
    )
    return est, time.perf_counter() - start


def product_seconds(model, x, y, reps: int = 3) -> dict[str, tuple[float, float]]:
    """(build seconds, median seconds per product) of the Hessian and the GGN engines, graphs kept."""
    out = {}
    with measuring(model):
        f = FlatLoss(model, F.cross_entropy)
        v = torch.randn(1, f.w.numel(), generator=torch.Generator().manual_seed(0))
        for name, engine in (("hvp", HVP), ("ggn", GGN)):
            start = time.perf_counter()
            products = engine(f, x, y, batch=len(y), mode="graph")
            build = time.perf_counter() - start
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                products(v)
                times.append(time.perf_counter() - start)
            out[name] = (build, statistics.median(times))
            del products
    return out


# ------------------------------------------------------------------------------ setup
def examples(n: int, data_root: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    os.environ.setdefault("SAMTUNE_OFFLINE", "1")  # a benchmark never waits on a download
    try:
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=16, help="SGD steps before measuring")
    parser.add_argument("--eig-error", type=float, default=1e-3, help="top eigenvalue: relative error")
    parser.add_argument("--trace-rel-se", type=float, default=0.02, help="trace: relative standard error")
    parser.add_argument("--reference-tol", type=float, default=1e-6, help="reference Lanczos residual bound")
    parser.add_argument("--reference-iters", type=int, default=80, help="reference Lanczos cap (products)")
    parser.add_argument("--iters", type=int, default=40, help="samtune's Lanczos cap (products)")
    parser.add_argument("--max-iter", type=int, default=100, help="power iteration's cap (products)")
    parser.add_argument("--max-probes", type=int, default=400, help="each trace estimator's cap (products)")
    parser.add_argument("--sketch", type=int, default=10, help="Hutch++ sketch size (products)")
    parser.add_argument("--repeats", type=int, default=0, help="more trace seeds, for the spread")
    parser.add_argument(
        "--data-root",
        default=str(SHARED_CIFAR10) if SHARED_CIFAR10.exists() else None,
        help="CIFAR-10 folder or tarball (default: the shared tarball, if present)",
    )
    parser.add_argument(
        "--pyhessian", action="store_true", help="baseline: the pyhessian package, on PYTHONPATH (see the module doc)"
    )
    return parser.parse_args()


def top_eigenvalue(model, x, y, args) -> tuple[float, dict, Target]:
    """The reference, samtune's Lanczos and the baseline's power iteration; printed."""
    start = time.perf_counter()
    ref = top_eig_estimate(
        model, F.cross_entropy, x, y, iters=args.reference_iters, tol=args.reference_tol, batch=len(y), seed=1234
    )
    reference = ref.value[0]
    print(
        f"reference: top_eig={reference:.6f} (Lanczos, residual bound {ref.residual:.1e}, "
        f"{ref.products} products, {time.perf_counter() - start:.1f} s)"
    )
    ours = samtune_top(model, x, y, reference, args)
    first = ours["first"]
    print(
        f"samtune Lanczos, own residual rule: top_eig={ours['value']:.6f} "
        f"(error {abs(ours['value'] - reference) / abs(reference):.1e}, residual {ours['residual']:.1e}, "
        f"{ours['products']} products, {ours['seconds']:.1f} s); first within {args.eig_error:g} at "
        + (f"product {first[0]} ({first[1]:.1f} s)" if first else "no product")
    )
    target = Target(reference, args.eig_error, args.trace_rel_se, args.max_iter)
    power = baseline_top(model, x, y, target, args.pyhessian)
    error = abs(power - reference) / abs(reference)
    print(
        f"power iteration, stopped within {args.eig_error:g} of the reference: top_eig={power:.6f} "
        f"(error {error:.1e}, {target.products} products, {target.seconds:.1f} s)"
        + (f"; reached --max-iter {args.max_iter} before the target" if error > args.eig_error else "")
    )
    return power, ours, target


def trace(model, x, y, args) -> tuple[tuple, Target]:
    """samtune's Hutch++ and the baseline's Hutchinson to the same relative standard error; printed."""
    est, seconds = samtune_trace(model, x, y, args)
    print(
        f"samtune Hutch++ (sketch {args.sketch}): trace={est.value:.3f} +- {est.stderr:.3f} "
        f"(rel se {est.stderr / abs(est.value):.3f}, {est.products} products, {seconds:.1f} s)"
    )
    target = Target(None, args.eig_error, args.trace_rel_se, args.max_probes)
    baseline_trace(model, x, y, target, args.pyhessian)
    mean, se = statistics.fmean(target.values), rel_se(target.values)
    print(
        f"Hutchinson (PyHessian's algorithm): trace={mean:.3f} +- {se * abs(mean):.3f} (rel se {se:.3f}, "
        f"{target.products} probes, {target.seconds:.1f} s)"
        + (f"; reached --max-probes {args.max_probes} before the target" if se > args.trace_rel_se else "")
    )
    return (est, seconds), target


def repeats(model, x, y, args) -> None:
    """The spread of both trace estimators over more seeds against their reported standard errors."""
    ours, theirs = [], []
    for seed in range(args.repeats + 1):
        ours.append(samtune_trace(model, x, y, args, seed=seed)[0])
        torch.manual_seed(100 + seed)
        target = Target(None, args.eig_error, args.trace_rel_se, args.max_probes)
        PyHessianReference(model, x, y).trace(target)
        model.zero_grad(set_to_none=True)
        theirs.append((statistics.fmean(target.values), rel_se(target.values)))
    print(
        f"spread over {args.repeats + 1} seeds: Hutch++ sd {statistics.stdev(e.value for e in ours):.3f} "
        f"vs mean reported se {statistics.fmean(e.stderr for e in ours):.3f}; Hutchinson sd "
        f"{statistics.stdev(m for m, _ in theirs):.3f} vs {statistics.fmean(s * abs(m) for m, s in theirs):.3f}"
    )


def speedup(baseline_s: float, ours_s: float, capped: bool) -> str:
    return f"{'>=' if capped else ''}{baseline_s / ours_s:.1f}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    x, y, source = examples(args.examples, args.data_root)
    model = warmed_up_model(args.model, x, y, args.warmup)
    print(
        f"model: {args.model} ({sum(p.numel() for p in model.parameters())} parameters), examples: "
        f"{len(y)} ({source}), threads: {args.threads}; baseline: "
        f"{'pyhessian package' if args.pyhessian else 'PyHessian algorithm (in this file)'}"
    )
    power, ours, power_target = top_eigenvalue(model, x, y, args)
    (est, trace_s), hutchinson = trace(model, x, y, args)
    if args.repeats > 0:
        repeats(model, x, y, args)
    costs = product_seconds(model, x, y)
    print(
        f"products (graphs kept, median of 3): hvp {costs['hvp'][1]:.3f} s (build {costs['hvp'][0]:.2f} s), "
        f"ggn {costs['ggn'][1]:.3f} s (build {costs['ggn'][0]:.2f} s)"
    )
    print(f"ggn_product/hvp_product={costs['ggn'][1] / costs['hvp'][1]:.2f}")
    # Products are what the seconds are made of, and do not depend on the machine's load.
    print(
        f"products to the targets (baseline/samtune): top_eig={power_target.products}/{ours['products']} "
        f"trace={hutchinson.products}/{est.products}"
    )
    reference = power_target.reference
    top_capped = abs(power - reference) > args.eig_error * abs(reference)
    trace_capped = rel_se(hutchinson.values) > args.trace_rel_se
    # The last line, exactly in this format: scripts read it.
    print(
        f"ratios: top_eig_speedup={speedup(power_target.seconds, ours['seconds'], top_capped)} "
        f"trace_speedup={speedup(hutchinson.seconds, trace_s, trace_capped)} "
        f"rel_diff={abs(ours['value'] - power) / abs(reference):.4f}"
    )


if __name__ == "__main__":
    main()

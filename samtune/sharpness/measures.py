"""The trainer's entry to the sharpness measures: which measures exist with their default
settings (`MEASURES`), checking a trial's choice before training (`check_measures`), and running
them into the flat ``sharpness/...`` metrics a trial logs (`measure_sharpness`). The measures
themselves are defined in `samtune.sharpness.worst_case` and `samtune.sharpness.curvature`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn

from samtune.contract.keys import DEFAULT_MEASURES
from samtune.contract.metrics import SHARPNESS_SHARED_KEYS
from samtune.sharpness.budget import Budget, cheapest_first, gradient_pass_seconds
from samtune.sharpness.curvature import (
    pac_bayes_sigma,
    top_eig_estimate,
    trace_estimate,
)
from samtune.sharpness.estimate import Estimate
from samtune.sharpness.ggn import is_cross_entropy
from samtune.sharpness.hvp import FlatLoss, LossFn
from samtune.sharpness.worst_case import (
    adaptive_sharpness,
    avg_sharpness_estimate,
    m_sharpness,
)

# name -> (function, default settings (logged, overridable), fixed settings (logged, not
# overridable: the name says them))
MEASURES: dict[str, tuple[Callable[..., Any], dict[str, Any], dict[str, Any]]] = {
    # ``ms``: further group sizes, each logged as ``m_sharpness_at_m<m>`` (the SAM paper's section 4.2
    # compares m); the value under the measure's own name stays the one at ``m``.
    "m_sharpness": (m_sharpness, {"rho": 0.05, "m": 128, "steps": 1, "ms": ()}, {}),
    # Both adaptive balls (L2 and L-infinity) are among the default measures: each costs two
    # gradient passes over the subset, little next to the Hessian measures' tens of products.
    "adaptive_sharpness": (adaptive_sharpness, {"rho": 0.5, "m": 128, "steps": 1, "eta": 0.0}, {"norm": "l2"}),
    "adaptive_sharpness_linf": (adaptive_sharpness, {"rho": 0.002, "m": 128, "steps": 1, "eta": 0.0}, {"norm": "linf"}),
    "avg_sharpness": (avg_sharpness_estimate, {"sigma": 0.01, "samples": 8, "adaptive": False}, {}),
    "hessian_top_eig": (partial(top_eig_estimate, curvature="hessian"), {"k": 1, "iters": 40, "tol": 1e-3}, {}),
    "hessian_trace": (partial(trace_estimate, curvature="hessian"), {"probes": 24, "method": "hutchpp"}, {}),
    # The Gauss-Newton matrix of the cross-entropy (positive semi-definite; no second derivative
    # of the network): cheaper products than the Hessian's, for cross-entropy losses only.
    "ggn_top_eig": (partial(top_eig_estimate, curvature="ggn"), {"k": 1, "iters": 40, "tol": 1e-3}, {}),
    "ggn_trace": (partial(trace_estimate, curvature="ggn"), {"probes": 24, "method": "hutchpp"}, {}),
    "pac_bayes_sigma": (pac_bayes_sigma, {"target": 0.1, "samples": 8, "steps": 12, "low": 1e-5, "high": 1.0}, {}),
}

_CURVATURE = {"hessian_top_eig", "hessian_trace", "ggn_top_eig", "ggn_trace"}
_SEEDED = {"avg_sharpness", "pac_bayes_sigma"} | _CURVATURE
_CHUNKED = {"avg_sharpness", "pac_bayes_sigma"} | _CURVATURE

# Settings that change speed or memory only, never the value: accepted, not logged.
_ENGINE = {
    name: {"mode", "memory_share"} | ({"probe_batch"} if name.endswith("_trace") else set()) for name in _CURVATURE
}


#: Keys `sharpness/<key>` that measure_sharpness logs beside the measures (the contract's list).
SHARED_KEYS = SHARPNESS_SHARED_KEYS


def check_measures(measures: Iterable[str], settings: dict[str, Any] | None = None) -> None:
    """Raise ValueError for a measure name, or a per-measure setting, `measure_sharpness` would
    refuse: a trainer checks its config with this before training, not at its last epoch."""
    settings = settings or {}
    for name in list(settings) + list(measures):
        if name not in MEASURES:
            raise ValueError(f"unknown sharpness measure {name!r}; expected some of {sorted(MEASURES)}")
    for name, extra in settings.items():
        if not isinstance(extra, dict):
            raise ValueError(f"settings for {name!r} must be a dict like {{'rho': 0.1}}, got {extra!r}")
        known = set(MEASURES[name][1]) | _ENGINE.get(name, set())
        unknown = set(extra) - known
        if unknown:
            raise ValueError(f"{name}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")


def _check(
    measures: list[str],
    settings: dict[str, Any],
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    batch: int,
    budget_s: float | None,
) -> None:
    """Every argument `measure_sharpness` refuses (the examples, the batch, the budget,
    `check_measures`, and the GGN measures' loss), before any measure runs."""
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many inputs as labels and at least one; got {len(x)} inputs, {len(y)} labels")
    if batch < 1 or (budget_s is not None and not budget_s > 0):
        raise ValueError(f"need batch >= 1 and budget_s > 0 or None, got batch={batch}, budget_s={budget_s}")
    check_measures(measures, settings)
    ggn = [name for name in measures if name.startswith("ggn_")]
    if ggn and not is_cross_entropy(loss_fn):
        raise ValueError(f"{ggn} are defined for the cross-entropy loss only, got {loss_fn!r}")


def measure_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    measures: Iterable[str] = DEFAULT_MEASURES,
    seed: int = 0,
    batch: int = 512,
    params: Sequence[str] | None = None,
    budget_s: float | None = None,
    **settings: dict[str, Any],
) -> dict[str, float]:
    """Measure each of ``measures`` on (x, y), cheapest first, and return what to log, all floats:

    - ``"sharpness/<measure>"``: the value (``*_top_eig`` with ``k > 1`` adds
      ``"sharpness/hessian_top_eig_2"``, ... for the next eigenvalues and the spread
      ``"sharpness/hessian_top_eig_1_over_<k>"``, lambda_1 / lambda_k, `values_logged`;
      ``m_sharpness`` with ``ms`` adds ``"sharpness/m_sharpness_at_m<m>"`` per m);
    - ``"sharpness/<measure>/<setting>"``: every setting the value depends on, the fixed ones
      included (the ball's ``norm`` of the adaptive measures); booleans as 0/1, a string
      setting as ``"sharpness/<measure>/<setting>/<value>" = 1``;
    - its cost and uncertainty, ``"sharpness/<measure>/seconds"`` (every measure), ``/products``
      (curvature products), ``/residual`` (Lanczos's bound on the top eigenvalues' error),
      ``/stderr`` (traces and ``avg_sharpness``): the contract's ``SHARPNESS_ESTIMATE_KEYS``;
    - ``"sharpness/subset"``, ``"sharpness/seed"``, ``"sharpness/batch"`` (examples per forward
      pass, which sets the BatchNorm statistics) and ``"sharpness/num_params"`` (parameters
      measured, after the ``params`` filter), the names in ``SHARED_KEYS``;
    - with a ``params`` filter, ``"sharpness/params/<name or prefix>" = 1`` for each of its
      entries (none: all were measured). Those three kinds are MLflow params (`is_sharpness_setting`).

    ``budget_s``: the seconds the whole measurement may take (None: no limit). A gradient pass
    is timed first; a measure whose expected seconds (`samtune.sharpness.budget`) exceed what is
    left is skipped and logs ``"sharpness/<measure>/skipped" = 1`` with ``/expected_s`` and
    ``/left_s`` instead of a value (`samtune.sharpness.budget.skipped_note` puts it in words).
    ``settings`` override per measure, e.g. ``m_sharpness={"rho": 0.1, "steps": 5}``; ``m`` larger
    than the subset uses the subset. The GGN measures need the cross-entropy loss. The model
    (``x`` on its device, normalised) is used in train mode with BatchNorm on batch statistics,
    running statistics untouched, and left exactly as found. Raises ValueError for an unknown
    measure or setting, an empty subset, ``x``/``y`` of different lengths, a budget not > 0.

    >>> import torch
    >>> model = nn.Linear(4, 3)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> out = measure_sharpness(model, nn.functional.cross_entropy, x, y, measures=["m_sharpness"],
    ...                         m_sharpness={"rho": 0.1})
    >>> sorted(out)  # doctest: +NORMALIZE_WHITESPACE
    ['sharpness/batch', 'sharpness/m_sharpness', 'sharpness/m_sharpness/m',
     'sharpness/m_sharpness/ms', 'sharpness/m_sharpness/rho', 'sharpness/m_sharpness/seconds', 'sharpness/m_sharpness/steps',
     'sharpness/num_params', 'sharpness/seed', 'sharpness/subset']
    >>> out["sharpness/m_sharpness/m"], out["sharpness/m_sharpness/rho"], out["sharpness/num_params"]
    (16.0, 0.1, 15.0)
    >>> out["sharpness/m_sharpness"] >= 0.0
    True
    """
    measures = list(measures)
    _check(measures, settings, loss_fn, x, y, batch, budget_s)
    if isinstance(params, str):  # one name or prefix, not the characters of one
        params = [params]
    return _measure_all(model, loss_fn, x, y, measures, settings, seed, batch, params, budget_s)


def _measure_all(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    measures: list[str],
    settings: dict[str, Any],
    seed: int,
    batch: int,
    params: Sequence[str] | None,
    budget_s: float | None,
) -> dict[str, float]:
    """What `measure_sharpness` logs, of checked arguments: the shared metrics, then each measure,
    cheapest first, that the budget has room for."""
    out = _shared_metrics(FlatLoss(model, loss_fn, params).w.numel(), len(y), seed, batch, params)
    budget = (
        None
        if budget_s is None or not measures
        else Budget(budget_s, lambda: gradient_pass_seconds(model, loss_fn, x, y, batch, params))
    )
    for name in cheapest_first(measures, lambda n: _settings(n, settings.get(n, {}), len(y))[0]):
        out.update(_within_budget(budget, name, model, loss_fn, x, y, settings.get(name, {}), seed, batch, params))
    return out


def _within_budget(
    budget: Budget | None,
    name: str,
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    extra: dict[str, Any],
    seed: int,
    batch: int,
    params: Sequence[str] | None,
) -> dict[str, float]:
    """`_measure`, or what a measure logs when the budget has no room for it."""
    used = _settings(name, extra, len(y))[0]
    if budget is not None and not budget.fits(name, used):
        return budget.skipped(name, used)
    return _measure(name, model, loss_fn, x, y, extra, seed, batch, params)


def _shared_metrics(
    num_params: int, subset: int, seed: int, batch: int, params: Sequence[str] | None
) -> dict[str, float]:
    """What every measure was measured on: the ``SHARED_KEYS`` and the ``params`` filter."""
    shared = {"subset": subset, "seed": seed, "batch": batch, "num_params": num_params}
    out: dict[str, float] = {f"sharpness/{key}": float(shared[key]) for key in SHARED_KEYS}
    for entry in params or ():
        # A metric key per entry: MLflow metrics are numbers, and the filter is part of what the
        # value means.
        out[f"sharpness/params/{str(entry).rstrip('.')}"] = 1.0
    return out


def _settings(name: str, extra: dict[str, Any], subset: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A measure's settings the value depends on (defaults overridden by ``extra``; ``m`` at
    most the subset), and its engine settings (speed and memory only)."""
    _, defaults, _ = MEASURES[name]
    engine = _ENGINE.get(name, set())
    used = {**defaults, **{k: v for k, v in extra.items() if k not in engine}}
    if "m" in used:
        used["m"] = min(int(used["m"]), subset)
    if "ms" in used:
        used["ms"] = tuple(sorted({min(int(m), subset) for m in used["ms"]}))
    return used, {k: v for k, v in extra.items() if k in engine}


def _measure(
    name: str,
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    extra: dict[str, Any],
    seed: int,
    batch: int,
    params: Sequence[str] | None,
) -> dict[str, float]:
    """One measure's value(s), its cost and uncertainty, and the settings it ran with."""
    fn, _, fixed = MEASURES[name]
    used, engine = _settings(name, extra, len(y))
    kwargs = {**used, **fixed, **engine, "params": params}
    if name in _SEEDED:
        kwargs["seed"] = seed
    if name in _CHUNKED:
        kwargs["batch"] = batch
    ms = kwargs.pop("ms", ())
    start = time.perf_counter()
    estimate = fn(model, loss_fn, x, y, **kwargs)
    out = {f"sharpness/{name}_at_m{m}": float(fn(model, loss_fn, x, y, **{**kwargs, "m": m})) for m in ms}
    seconds = time.perf_counter() - start
    if not isinstance(estimate, Estimate):
        estimate = Estimate(estimate)
    out.update(values_logged(name, estimate.value))
    for key, setting in {**used, **fixed}.items():
        if isinstance(setting, str):
            out[f"sharpness/{name}/{key}/{setting}"] = 1.0
        else:  # ``ms``: how many further m; each m is in its value's key
            out[f"sharpness/{name}/{key}"] = float(len(setting) if isinstance(setting, tuple) else setting)
    out.update({f"sharpness/{name}/{key}": v for key, v in {**estimate.logged(), "seconds": seconds}.items()})
    return out


def values_logged(name: str, value: float | list[float]) -> dict[str, float]:
    """A measure's value(s) as logged: ``sharpness/<name>``, and for several eigenvalues
    (descending) ``sharpness/<name>_2`` ... ``_k`` and the spread ``sharpness/<name>_1_over_k``,
    lambda_1 / lambda_k (NaN where lambda_k <= 0: the ratio then says nothing about flatness).

    >>> values_logged("hessian_top_eig", [8.0, 4.0, 2.0])  # doctest: +NORMALIZE_WHITESPACE
    {'sharpness/hessian_top_eig': 8.0, 'sharpness/hessian_top_eig_2': 4.0,
     'sharpness/hessian_top_eig_3': 2.0, 'sharpness/hessian_top_eig_1_over_3': 4.0}
    """
    if not isinstance(value, list):
        return {f"sharpness/{name}": float(value)}
    out = {f"sharpness/{name}": float(value[0])}
    out.update({f"sharpness/{name}_{i}": float(v) for i, v in enumerate(value[1:], start=2)})
    if len(value) > 1:
        last = float(value[-1])
        out[f"sharpness/{name}_1_over_{len(value)}"] = float(value[0]) / last if last > 0 else math.nan
    return out

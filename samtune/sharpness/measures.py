"""Sharpness of a trained network, measured next to its test error.

Definitions follow Foret et al. 2020 (m-sharpness), Andriushchenko et al. 2023 ("A modern look at
the relationship between sharpness and generalization": adaptive worst-case and average-case
sharpness) and Jiang et al. 2019 ("Fantastic generalization measures": the PAC-Bayes sigma):

- ``m_sharpness``: mean over disjoint batches B of m examples of
  ``max_{||eps||_2 <= rho} L_B(w + eps) - L_B(w)``; the maximum by projected gradient ascent
  (``steps=1`` is SAM's own one-step estimate ``eps = rho g / ||g||``; the largest value over the
  iterates is kept, so more steps never report less).
- ``adaptive_sharpness`` / ``adaptive_sharpness_linf``: the same over the ball scaled by
  ``T = |w| + eta`` (``||T^-1 eps||_2 <= rho`` or ``||T^-1 eps||_inf <= rho``).
- ``avg_sharpness``: ``E[L(w + delta)] - L(w)``, ``delta ~ N(0, sigma^2 diag(c^2))``, ``c = 1`` or
  ``|w|`` (``adaptive=True``), Monte Carlo over ``samples`` antithetic pairs (+delta, -delta).
- ``hessian_top_eig``: the top-k eigenvalues of the Hessian of the loss on the subset (Lanczos with
  full reorthogonalisation, stopped on a residual bound; ``k=1`` reports the largest),
  ``hessian_trace``: Hutch++ (or plain Hutchinson) with Rademacher probes. Hessian-vector
  products come from a kept double-backward graph when it fits in memory (the fastest on CPU),
  otherwise from ``torch.func`` forward-over-reverse (``jvp(grad(f))``), falling back to
  reverse-over-reverse where an op lacks forward-mode support; on an accelerator probes are
  batched (``vmap`` / batched backward). The iteration loops keep their scalars on the device:
  the only host syncs are Lanczos's convergence tests (every 5 steps on an accelerator).
- ``pac_bayes_sigma``: the largest sigma whose Gaussian perturbation raises the training error by
  at most ``target`` (0.1), found by bisection.

Every measure runs in train mode with BatchNorm normalising by the batch but its running
statistics untouched (dropout off: the loss must be one deterministic function), and leaves the
model exactly as found (weights, buffers, mode, gradients).
A ``params`` filter (names or name prefixes) restricts any measure to one block of parameters.
Losses over the subset are evaluated in chunks of ``batch`` examples (BatchNorm statistics are
those of each chunk, as in training), averaged with the chunk sizes as weights.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from torch import Tensor, nn

from samtune.contract.keys import DEFAULT_MEASURES
from samtune.sharpness.curvature import hessian_top_eig, hessian_trace, pac_bayes_sigma
from samtune.sharpness.hvp import FlatLoss, LossFn
from samtune.sharpness.worst_case import adaptive_sharpness, avg_sharpness, m_sharpness

# ------------------------------------------------------------------------------ the trainer's entry
# name -> (function, default settings (logged, overridable), fixed settings (logged, not
# overridable: the name says them))
MEASURES: dict[str, tuple[Callable[..., Any], dict[str, Any], dict[str, Any]]] = {
    "m_sharpness": (m_sharpness, {"rho": 0.05, "m": 128, "steps": 1}, {}),
    "adaptive_sharpness": (adaptive_sharpness, {"rho": 0.5, "m": 128, "steps": 1, "eta": 0.0},
                           {"norm": "l2"}),
    "adaptive_sharpness_linf": (adaptive_sharpness, {"rho": 0.002, "m": 128, "steps": 1, "eta": 0.0},
                                {"norm": "linf"}),
    "avg_sharpness": (avg_sharpness, {"sigma": 0.01, "samples": 8, "adaptive": False}, {}),
    "hessian_top_eig": (hessian_top_eig, {"k": 1, "iters": 40, "tol": 1e-3}, {}),
    "hessian_trace": (hessian_trace, {"probes": 24, "method": "hutchpp"}, {}),
    "pac_bayes_sigma": (pac_bayes_sigma, {"target": 0.1, "samples": 8, "steps": 12, "low": 1e-5,
                                          "high": 1.0}, {}),
}


_SEEDED = {"avg_sharpness", "hessian_top_eig", "hessian_trace", "pac_bayes_sigma"}


_CHUNKED = {"avg_sharpness", "hessian_top_eig", "hessian_trace", "pac_bayes_sigma"}


# Settings that change speed or memory only, never the value: accepted, not logged.
_ENGINE = {"hessian_top_eig": {"mode", "memory_share"},
           "hessian_trace": {"mode", "probe_batch", "memory_share"}}


# Both adaptive worst-case balls (L2 and L-infinity) are in: each costs two gradient passes over
# the subset, little next to the Hessian measures' tens of products.


# Keys `sharpness/<key>` that measure_sharpness logs beside the measures: what was measured on,
# not a measure. (samtune.report keeps its own copy so that it need not import torch; a test
# checks the two agree.)
SHARED_KEYS = ("subset", "seed", "batch", "num_params")


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


def measure_sharpness(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *,
                      measures: Iterable[str] = DEFAULT_MEASURES, seed: int = 0, batch: int = 512,
                      params: Sequence[str] | None = None, **settings: dict[str, Any]) -> dict[str, float]:
    """Measure each of ``measures`` on (x, y) and return what to log, all floats:

    - ``"sharpness/<measure>"``: the value (``hessian_top_eig`` with ``k > 1`` adds
      ``"sharpness/hessian_top_eig_2"``, ... for the next eigenvalues);
    - ``"sharpness/<measure>/<setting>"``: every setting the value depends on, the fixed ones
      included (the ball's ``norm`` of the adaptive measures); booleans as 0/1, a string
      setting as ``"sharpness/<measure>/<setting>/<value>" = 1``;
    - ``"sharpness/subset"``, ``"sharpness/seed"``, ``"sharpness/batch"`` (examples per forward
      pass, which sets the BatchNorm statistics) and ``"sharpness/num_params"`` (parameters
      measured, after the ``params`` filter), the names in ``SHARED_KEYS``;
    - with a ``params`` filter, ``"sharpness/params/<name or prefix>" = 1`` for each of its
      entries (no such key: every trainable parameter was measured).

    ``settings`` override per measure, e.g. ``m_sharpness={"rho": 0.1, "steps": 5}``; ``m`` larger
    than the subset uses the subset. The model (``x`` on its device, already normalised) is used
    in train mode with BatchNorm on batch statistics and its running statistics untouched, and is
    left exactly as found. An empty ``measures`` returns only the shared keys.
    Raises ValueError for an unknown measure or setting, an empty subset, or ``x``/``y`` of
    different lengths.
    """
    measures = list(measures)
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many inputs as labels and at least one; got {len(x)} inputs, "
                         f"{len(y)} labels")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    check_measures(measures, settings)
    if isinstance(params, str):  # one name or prefix, not the characters of one
        params = [params]
    selected = FlatLoss(model, loss_fn, params).w.numel()
    shared = {"subset": len(y), "seed": seed, "batch": batch, "num_params": selected}
    out: dict[str, float] = {f"sharpness/{key}": float(shared[key]) for key in SHARED_KEYS}
    for entry in params or ():
        # A metric key per entry: MLflow metrics are numbers, and the filter is part of what the
        # value means.
        out[f"sharpness/params/{str(entry).rstrip('.')}"] = 1.0
    for name in measures:
        fn, defaults, fixed = MEASURES[name]
        extra = settings.get(name, {})
        engine = _ENGINE.get(name, set())
        used = {**defaults, **{k: v for k, v in extra.items() if k not in engine}}
        if "m" in used:
            used["m"] = min(int(used["m"]), len(y))
        kwargs = {**used, **fixed, **{k: v for k, v in extra.items() if k in engine}, "params": params}
        if name in _SEEDED:
            kwargs["seed"] = seed
        if name in _CHUNKED:
            kwargs["batch"] = batch
        value = fn(model, loss_fn, x, y, **kwargs)
        if isinstance(value, list):
            for i, v in enumerate(value[1:], start=2):
                out[f"sharpness/{name}_{i}"] = v
            value = value[0]
        out[f"sharpness/{name}"] = float(value)
        for key, setting in {**used, **fixed}.items():
            if isinstance(setting, str):
                out[f"sharpness/{name}/{key}/{setting}"] = 1.0
            else:
                out[f"sharpness/{name}/{key}"] = float(setting)
    return out

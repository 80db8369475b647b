"""The trainer's entry to the sharpness measures: which measures exist with their default
settings (`MEASURES`), checking a trial's choice before training (`check_measures`), and running
them into the flat ``sharpness/...`` metrics a trial logs (`measure_sharpness`). The measures
themselves are defined in `samtune.sharpness.worst_case` and `samtune.sharpness.curvature`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from torch import Tensor, nn

from samtune.contract.keys import DEFAULT_MEASURES
from samtune.contract.metrics import SHARPNESS_SHARED_KEYS
from samtune.sharpness.curvature import hessian_top_eig, hessian_trace, pac_bayes_sigma
from samtune.sharpness.hvp import FlatLoss, LossFn
from samtune.sharpness.worst_case import adaptive_sharpness, avg_sharpness, m_sharpness

# name -> (function, default settings (logged, overridable), fixed settings (logged, not
# overridable: the name says them))
MEASURES: dict[str, tuple[Callable[..., Any], dict[str, Any], dict[str, Any]]] = {
    "m_sharpness": (m_sharpness, {"rho": 0.05, "m": 128, "steps": 1}, {}),
    # Both adaptive balls (L2 and L-infinity) are among the default measures: each costs two
    # gradient passes over the subset, little next to the Hessian measures' tens of products.
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

    >>> import torch
    >>> model = nn.Linear(4, 3)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> out = measure_sharpness(model, nn.functional.cross_entropy, x, y, measures=["m_sharpness"],
    ...                         m_sharpness={"rho": 0.1})
    >>> sorted(out)  # doctest: +NORMALIZE_WHITESPACE
    ['sharpness/batch', 'sharpness/m_sharpness', 'sharpness/m_sharpness/m',
     'sharpness/m_sharpness/rho', 'sharpness/m_sharpness/steps', 'sharpness/num_params',
     'sharpness/seed', 'sharpness/subset']
    >>> out["sharpness/m_sharpness/m"], out["sharpness/m_sharpness/rho"], out["sharpness/num_params"]
    (16.0, 0.1, 15.0)
    >>> out["sharpness/m_sharpness"] >= 0.0
    True
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
    out = _shared_metrics(FlatLoss(model, loss_fn, params).w.numel(), len(y), seed, batch, params)
    for name in measures:
        out.update(_measure(name, model, loss_fn, x, y, settings.get(name, {}), seed, batch, params))
    return out


def _shared_metrics(num_params: int, subset: int, seed: int, batch: int,
                    params: Sequence[str] | None) -> dict[str, float]:
    """What every measure was measured on: the ``SHARED_KEYS`` and the ``params`` filter."""
    shared = {"subset": subset, "seed": seed, "batch": batch, "num_params": num_params}
    out: dict[str, float] = {f"sharpness/{key}": float(shared[key]) for key in SHARED_KEYS}
    for entry in params or ():
        # A metric key per entry: MLflow metrics are numbers, and the filter is part of what the
        # value means.
        out[f"sharpness/params/{str(entry).rstrip('.')}"] = 1.0
    return out


def _measure(name: str, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, extra: dict[str, Any],
             seed: int, batch: int, params: Sequence[str] | None) -> dict[str, float]:
    """One measure's value(s) and the settings it ran with (defaults overridden by ``extra``)."""
    fn, defaults, fixed = MEASURES[name]
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
    out: dict[str, float] = {}
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

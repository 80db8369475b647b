"""What each sharpness measure is expected to cost, and the time budget of a measurement.

Costs are counted in gradient passes over the subset (one forward and one backward through every
example), from each measure's settings at their cap: a worst-case ascent takes ``1 + steps``
passes, a Monte Carlo average ``1 + 2 samples`` forward passes, Lanczos at most ``iters``
curvature products, a trace ``probes`` products. A forward pass counts as a third of a gradient
pass, a Hessian-vector product as 4 passes and a Gauss-Newton-vector product as 2.5 (on
ResNet-20 on a CPU they measured 3.6x and 2.1x a gradient pass, `benchmarks/sharpness.py`), and
building the kept graphs as one pass more. `Budget` times one gradient pass on the subset to turn passes into
seconds; a measure *would not fit* when the seconds used so far plus its expected seconds exceed
the budget. Expected costs are upper bounds (Lanczos usually stops well before ``iters``), so
under a tight budget a measure may be skipped that would have fitted, never the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from samtune.sharpness.hvp import FlatLoss, LossFn, chunks, measuring

FORWARD_PASS = 1 / 3
HESSIAN_PRODUCT = 4.0
GGN_PRODUCT = 2.5


def _ascent(s: dict[str, Any]) -> float:
    # One ascent at m, and one more at each further m of ``ms`` (m_sharpness only).
    return (1.0 + s["steps"]) * (1 + len(s.get("ms", ())))


def _average(s: dict[str, Any]) -> float:
    return (1 + 2 * s["samples"]) * FORWARD_PASS


def _bisection(s: dict[str, Any]) -> float:
    return (1 + s["steps"] * s["samples"]) * FORWARD_PASS


def _products(per_product: float, count_setting: str) -> Callable[[dict[str, Any]], float]:
    return lambda s: 1.0 + per_product * s[count_setting]


#: Each measure's expected gradient passes, from its settings (defaults already filled in).
PASSES: dict[str, Callable[[dict[str, Any]], float]] = {
    "m_sharpness": _ascent,
    "adaptive_sharpness": _ascent,
    "adaptive_sharpness_linf": _ascent,
    "avg_sharpness": _average,
    "pac_bayes_sigma": _bisection,
    "hessian_top_eig": _products(HESSIAN_PRODUCT, "iters"),
    "hessian_trace": _products(HESSIAN_PRODUCT, "probes"),
    "ggn_top_eig": _products(GGN_PRODUCT, "iters"),
    "ggn_trace": _products(GGN_PRODUCT, "probes"),
}


def cheapest_first(measures: Iterable[str], used: Callable[[str], dict[str, Any]]) -> list[str]:
    """``measures`` ordered by expected passes under their settings (``used(name)``), ties kept
    in the order given.

    >>> settings = {"hessian_trace": {"probes": 24}, "m_sharpness": {"steps": 1}}
    >>> cheapest_first(["hessian_trace", "m_sharpness"], settings.get)
    ['m_sharpness', 'hessian_trace']
    """
    return sorted(measures, key=lambda name: PASSES[name](used(name)))


def gradient_pass_seconds(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, batch: int, params: Sequence[str] | None
) -> float:
    """Seconds of one gradient pass over (x, y) in chunks of ``batch``, as the measures run it."""
    start = time.perf_counter()
    with measuring(model):
        f = FlatLoss(model, loss_fn, params)
        for part in chunks(len(y), batch):
            f.gradient(f.w, x[part], y[part])
    return time.perf_counter() - start


class Budget:
    """The seconds a measurement may take, counted from its creation, which times a gradient
    pass (those seconds count too). ``fits(name, used)`` says whether the measure would fit;
    ``skipped(name, used)`` is what a skipped measure logs."""

    def __init__(self, seconds: float, pass_seconds: Callable[[], float]):
        self.seconds, self.start = seconds, time.perf_counter()
        self.pass_s = pass_seconds()

    def expected_s(self, name: str, used: dict[str, Any]) -> float:
        return PASSES[name](used) * self.pass_s

    def left_s(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, name: str, used: dict[str, Any]) -> bool:
        return self.expected_s(name, used) <= self.left_s()

    def skipped(self, name: str, used: dict[str, Any]) -> dict[str, float]:
        return {
            f"sharpness/{name}/skipped": 1.0,
            f"sharpness/{name}/expected_s": self.expected_s(name, used),
            f"sharpness/{name}/left_s": max(self.left_s(), 0.0),
        }


def skipped_note(logged: dict[str, float]) -> str | None:
    """In words, the measures a budget skipped and why, from what the measurement logged (None
    when none was skipped).

    >>> skipped_note({"sharpness/hessian_trace/skipped": 1.0, "sharpness/hessian_trace/expected_s": 75.0,
    ...               "sharpness/hessian_trace/left_s": 12.5})
    'hessian_trace skipped: expected 75.0 s, 12.5 s of the sharpness budget left'
    >>> skipped_note({"sharpness/m_sharpness": 0.1}) is None
    True
    """
    names = [k.split("/")[1] for k, v in logged.items() if k.endswith("/skipped") and v]
    if not names:
        return None
    return "; ".join(
        f"{n} skipped: expected {logged[f'sharpness/{n}/expected_s']:.1f} s, "
        f"{logged[f'sharpness/{n}/left_s']:.1f} s of the sharpness budget left"
        for n in names
    )

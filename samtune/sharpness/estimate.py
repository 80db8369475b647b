"""A sharpness value with what it cost and how far it can be off, as the estimators return it.

`Estimate` carries the value (a list for several eigenvalues) and, where the estimator has
them, the curvature products it used, the Lanczos residual bound and the standard error;
`Estimate.logged` gives those as the ``sharpness/<measure>/<key>`` suffixes a trial logs (the
contract's `SHARPNESS_ESTIMATE_KEYS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, TypeVar

#: A scalar value, or a list for several eigenvalues.
V = TypeVar("V", bound="float | list[float]")


@dataclass(frozen=True)
class Estimate(Generic[V]):
    """One measure's value and its uncertainty and cost (None where the estimator has none).

    >>> Estimate(2.5, products=12, stderr=0.1).logged()
    {'products': 12.0, 'stderr': 0.1}
    """

    value: V
    #: Hessian- or GGN-vector products spent.
    products: int | None = None
    #: Lanczos's bound on the distance from the reported eigenvalue(s) to true ones (the largest
    #: of the top-k bounds ``beta_j |s_j|``).
    residual: float | None = None
    #: Standard error of a stochastic estimate (Hutchinson / Hutch++ trace, Monte Carlo mean).
    stderr: float | None = None

    def logged(self) -> dict[str, float]:
        """The known uncertainty and cost figures, by key; a non-finite figure is left out."""
        figures = {"products": self.products, "residual": self.residual, "stderr": self.stderr}
        return {k: float(v) for k, v in figures.items() if v is not None and math.isfinite(float(v))}

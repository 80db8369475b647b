"""Sharpness of a trained network, measured next to its test error.

Definitions follow Foret et al. 2020 (m-sharpness), Andriushchenko et al. 2023 ("A modern look at
the relationship between sharpness and generalization": adaptive worst-case and average-case
sharpness) and Jiang et al. 2019 ("Fantastic generalization measures": the PAC-Bayes sigma):

- worst case (`samtune.sharpness.worst_case`): ``m_sharpness``, the largest loss rise in an L2
  ball of radius rho, per batch of m examples; ``adaptive_sharpness`` /
  ``adaptive_sharpness_linf``, the same over a ball scaled by ``|w| + eta``;
- average case (`samtune.sharpness.worst_case`): ``avg_sharpness``, the mean loss rise under
  Gaussian noise;
- curvature (`samtune.sharpness.curvature`): ``hessian_top_eig`` and ``hessian_trace`` of the
  loss, from Hessian-vector products (`samtune.sharpness.hvp`), ``ggn_top_eig`` and
  ``ggn_trace`` of its Gauss-Newton matrix (cross-entropy only; `samtune.sharpness.ggn`), and
  ``pac_bayes_sigma``, the largest noise level the training error tolerates; with ``k = 5``
  the top eigenvalues' spread ``hessian_top_eig_1_over_5`` (lambda_1 / lambda_5);
- the whole spectrum (`samtune.sharpness.density`): the Hessian's eigenvalue density by
  stochastic Lanczos quadrature, ``spectral_density``; too costly to take per trial, not a
  measure of ``measure_sharpness``.

`samtune.sharpness.measures.measure_sharpness` runs a chosen set of them, cheapest first, and
returns what a trial logs: each value with its seconds, and where the estimator has them its
products, Lanczos residual bound or standard error (`samtune.sharpness.estimate`); under a time
budget (`samtune.sharpness.budget`) the measures that would not fit are skipped and say so. Every measure runs in train mode with BatchNorm normalising by the batch but its
running statistics untouched (dropout off: the loss must be one deterministic function), and
leaves the model exactly as found (weights, buffers, mode, gradients). A ``params`` filter
(names or name prefixes) restricts any measure to one block of parameters. Losses over the
subset are evaluated in chunks of ``batch`` examples (BatchNorm statistics are those of each
chunk, as in training), averaged with the chunk sizes as weights.

Offers: `measure_sharpness`, `check_measures`, `MEASURES`, `SHARED_KEYS` (measures), `FlatLoss`
(hvp), `m_sharpness`, `adaptive_sharpness`, `avg_sharpness` (worst_case), `hessian_top_eig`,
`hessian_trace`, `pac_bayes_sigma` (curvature). Kept: the Gauss-Newton products (ggn), the spectral
density (density), the costs and time budget (budget) and the value-with-error type the estimators return (estimate).
"""

from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

"""Every metric a trial reports, once: its name, when it is reported, and whether a sweep may
optimise it.

The trainer reports these every epoch (`samtune.trial`), the sweep records them in MLflow and
refuses to optimise a metric that is not reported every epoch (ASHA compares trials at every
rung, and Tune fails a trial whose result lacks the metric), and the report reads them back.
Sharpness measures add ``sharpness/<measure>`` (and ``sharpness/<key>`` for what they were
measured on) at the epochs they are measured; their names belong to `samtune.sharpness`. Which of
those keys are settings of the measurement, fixed for a trial and recorded as MLflow params rather
than metric series, is said here once (`is_sharpness_setting`, `sharpness_params`,
`sharpness_settings`).

>>> METRICS["test_error"].optimisable, METRICS["test_error"].when
(True, 'every epoch')
>>> "lr" in OPTIMISABLE
False
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One reported metric: when it is there, whether a sweep may optimise it, what it means."""

    when: str
    optimisable: bool
    doc: str
    #: Its value for a diverged trial: the worst it can be ("loss": the trial's divergence_loss).
    worst: float | str | None = None


_EVERY = "every epoch"
_TRAIN_EVAL = "every train_eval_every epochs and the last (default: every epoch)"
_VAL = "every epoch, with a validation split (val_fraction > 0)"

#: Every per-epoch metric, in the order the README lists them.
METRICS: dict[str, Metric] = {
    "epoch": Metric(_EVERY, False, "the epoch just finished (1, 2, ...)"),
    "train_loss": Metric(
        _EVERY,
        True,
        "running mean of the training loss over the epoch (train mode, augmented batches, noisy labels)",
        worst="loss",
    ),
    "train_acc_noisy": Metric(_EVERY, True, "running accuracy on the labels trained on", worst=0.0),
    "train_acc_true": Metric(_EVERY, True, "running accuracy on the clean labels", worst=0.0),
    "train_error": Metric(
        _TRAIN_EVAL,
        True,
        "eval-mode top-1 error on a fixed 1,024-example training subset, against the labels trained on",
        worst=1.0,
    ),
    "flipped_acc_noisy": Metric(
        _TRAIN_EVAL + ", when the eval subset holds flipped labels",
        False,
        "accuracy on the flipped examples against their noisy label (memorisation)",
    ),
    "flipped_acc_true": Metric(
        _TRAIN_EVAL + ", when the eval subset holds flipped labels",
        False,
        "accuracy on the flipped examples against their true label",
    ),
    "val_error": Metric(_VAL, True, "top-1 error on the held-out part of the noisy training set", worst=1.0),
    "val_loss": Metric(_VAL, True, "mean cross-entropy on the held-out part of the noisy training set", worst="loss"),
    "test_error": Metric(_EVERY, True, "top-1 error on the clean test set", worst=1.0),
    "test_loss": Metric(_EVERY, True, "mean cross-entropy on the clean test set", worst="loss"),
    "generalization_gap": Metric(_TRAIN_EVAL, True, "test_error - train_error", worst=1.0),
    "epoch_time_s": Metric(_EVERY, True, "seconds of this epoch"),
    "samples_per_s": Metric(_EVERY, True, "training examples per second", worst=0.0),
    "train_time_s": Metric(_EVERY, True, "cumulative seconds"),
    "compute_time_s": Metric(_EVERY, True, "cumulative seconds of training, evaluation and sharpness alone"),
    "lr": Metric(_EVERY, False, "the head's (the schedule's) learning rate"),
    "lr_backbone": Metric("every epoch, finetuning", False, "the pretrained layers' learning rate"),
    "pretrained_test_error": Metric(
        "first epoch, finetuning",
        False,
        "the starting point's test error: the pretrained backbone, frozen, "
        "with a linear head fit to the training labels, before any step",
    ),
    "pretrained_val_error": Metric(
        "first epoch, finetuning, with a validation split",
        False,
        "the starting point's validation error (as pretrained_test_error)",
    ),
    "diverged": Metric(_EVERY, False, "1 when the loss went non-finite or above divergence_loss"),
    "m_effective": Metric("every epoch, SAM/ASAM", False, "examples behind one perturbation"),
    "m_workers": Metric("every epoch, SAM/ASAM", False, "workers sharing one perturbation"),
    "m_groups_per_worker": Metric("every epoch, SAM/ASAM", False, "perturbations per worker per step"),
    "m_per_worker_batch": Metric("every epoch, SAM/ASAM", False, "the per-worker batch"),
    "nodes": Metric("every epoch, under Ray", False, "distinct Ray nodes the trial's workers run on"),
    "allreduce_per_step": Metric("every epoch, several workers", False, "gradient all-reduce rounds per training step"),
}

#: What a sweep may optimise (besides a ``sharpness/<measure>`` measured every epoch).
OPTIMISABLE = tuple(name for name, metric in METRICS.items() if metric.optimisable)

#: The text a trial reports when its sharpness budget skipped measures (which, and why).
SHARPNESS_SKIPPED_NOTE = "sharpness_skipped"

#: Metrics with a value of text, not a number: recorded as MLflow tags, never as metric series.
TEXT_METRICS = ("m_plan", "placement", SHARPNESS_SKIPPED_NOTE)


#: What a sharpness measurement logs beside the measures, as ``sharpness/<key>``: what it was
#: measured on (examples, seed, examples per forward pass, parameters measured), not a measure.
SHARPNESS_SHARED_KEYS = ("subset", "seed", "batch", "num_params")

#: What a sharpness measurement logs beside each measure's value, as ``sharpness/<measure>/<key>``:
#: its cost and uncertainty, not a setting. ``seconds`` (every measure), ``products`` (curvature
#: products), ``residual`` (Lanczos bound), ``stderr`` (stochastic estimates); under a time budget
#: a measure that would not fit logs ``skipped`` = 1 and ``expected_s``, the seconds it was expected
#: to take, and ``left_s``, the budget's seconds left when it was skipped.
SHARPNESS_ESTIMATE_KEYS = ("seconds", "products", "residual", "stderr", "skipped", "expected_s", "left_s")

#: What `samtune train` prints every epoch (beside the sharpness measures).
PRINTED = ("epoch", "train_loss", "train_acc_noisy", "train_acc_true", "val_error", "test_error", "epoch_time_s")


def worst_values(divergence_loss: float) -> dict[str, float]:
    """Every metric that has a worst value, at it: what a diverged trial reports, so it stays a
    bad (finite) result for ASHA and TPE whatever the sweep optimises.

    >>> worst_values(1e3)["test_error"], worst_values(1e3)["val_loss"]
    (1.0, 1000.0)
    """
    return {
        name: float(divergence_loss) if m.worst == "loss" else float(m.worst)
        for name, m in METRICS.items()
        if m.worst is not None
    }


def reported_metrics() -> tuple[str, ...]:
    """The per-epoch metrics a sweep may optimise (`OPTIMISABLE`)."""
    return OPTIMISABLE


# -- sharpness settings: params, not metric series -----------------------------------------------


def is_sharpness_setting(key: str) -> bool:
    """Whether a reported ``sharpness/...`` key is a setting of the measurement, fixed for a trial:
    what it was measured on (``sharpness/<shared key>``, `SHARPNESS_SHARED_KEYS`), the parameter
    filter (``sharpness/params/<name>``), a measure's number setting (``sharpness/<measure>/<setting>``
    but for the cost and uncertainty keys, `SHARPNESS_ESTIMATE_KEYS`) or its text setting
    (``sharpness/<measure>/<setting>/<value>``). A measure's value, its further eigenvalues
    (``sharpness/<measure>_2``), its cost and uncertainty are not settings.

    >>> [is_sharpness_setting(k) for k in ("sharpness/seed", "sharpness/m_sharpness/rho",
    ...  "sharpness/adaptive_sharpness/norm/l2", "sharpness/params/head")]
    [True, True, True, True]
    >>> [is_sharpness_setting(k) for k in ("sharpness/m_sharpness", "sharpness/hessian_trace/stderr",
    ...  "sharpness/hessian_top_eig_2", "test_error", "sharpness_subset")]
    [False, False, False, False, False]
    """
    parts = key.split("/")
    if parts[0] != "sharpness" or len(parts) < 2:
        return False
    if len(parts) == 2:
        return parts[1] in SHARPNESS_SHARED_KEYS
    return parts[1] == "params" or len(parts) > 3 or parts[2] not in SHARPNESS_ESTIMATE_KEYS


def sharpness_params(reported: Mapping[str, float]) -> dict[str, str]:
    """The settings among what a sharpness measurement reported, as MLflow params (text): a number
    setting under its own key (``"sharpness/m_sharpness/rho": "0.05"``, whole numbers without a
    decimal point), a text setting under ``sharpness/<measure>/<setting>`` with its value
    (``"sharpness/adaptive_sharpness/norm": "l2"``, reported as ``.../norm/l2`` = 1).
    `sharpness_settings` reads them back.

    >>> sharpness_params({"sharpness/m_sharpness": 0.3, "sharpness/m_sharpness/rho": 0.05,
    ...                   "sharpness/seed": 0.0, "sharpness/adaptive_sharpness/norm/l2": 1.0})
    {'sharpness/m_sharpness/rho': '0.05', 'sharpness/seed': '0', 'sharpness/adaptive_sharpness/norm': 'l2'}
    """
    params = {}
    for key, value in reported.items():
        if not is_sharpness_setting(key):
            continue
        parts = key.split("/")
        if len(parts) > 3 and parts[1] != "params":
            params["/".join(parts[:3])] = "/".join(parts[3:])
        else:
            params[key] = _number_text(float(value))
    return params


def sharpness_settings(params: Mapping[str, str]) -> dict[str, float]:
    """The sharpness settings among a run's MLflow params, as the measurement reported them (the
    inverse of `sharpness_params`): numbers as they are, a text setting as
    ``sharpness/<measure>/<setting>/<value>`` = 1. Other params are left out.

    >>> sharpness_settings({"sharpness/m_sharpness/rho": "0.05", "sharpness/adaptive_sharpness/norm": "l2",
    ...                     "lr": "0.1"})
    {'sharpness/m_sharpness/rho': 0.05, 'sharpness/adaptive_sharpness/norm/l2': 1.0}
    """
    out = {}
    for key, text in params.items():
        if not is_sharpness_setting(key):
            continue
        try:
            out[key] = float(text)
        except ValueError:
            out[f"{key}/{text}"] = 1.0
    return out


def _number_text(value: float) -> str:
    """A number as a param reads best: ``128`` rather than ``128.0``, ``0.05`` as is."""
    if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)

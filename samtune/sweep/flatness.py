"""Which confirmation runs measure the Hessian's top eigenvalues, for the claim that SAM finds
flatter minima (Foret et al. 2020, section 4.2: lambda_max and lambda_max / lambda_5).

A search trial is one run of one configuration: comparing its lambda_max between SAM and SGD has
no seeds to pair. The confirmation runs of a cell's best SGD and best SAM do: in the cells with
ablation curves (the cells a sweep studies closely), each of them measures the top `K`
eigenvalues of its final weights' training-loss Hessian by Lanczos, with the residual bound
beside them (``sharpness/hessian_top_eig*``), on the sweep's sharpness subset and with its
settings for ``hessian_top_eig``. The claims table pairs them by seed
(`samtune.report.claims.flatter_minima`).

Only a sweep that asks for a Hessian measure among its trials' ``sharpness_measures`` gets
them: one that asked for none (on a CPU and a large model they take minutes) gets none, and
its claims row says what would test it. Measured after the last epoch's evaluation and on a
copy of nothing the run reports, they change no error the verdicts read.
"""

from __future__ import annotations

from typing import Any

from samtune.contract.keys import TRIAL_KEYS
from samtune.sweep.study import Cell, Sweep

#: The picks whose confirmation runs measure it: the two the cell's verdict compares.
PICKS = ("best_sgd", "best_sam")
#: How many top eigenvalues: lambda_max / lambda_5 is the paper's spread of the spectrum.
K = 5
MEASURE = "hessian_top_eig"


def measures_hessian(sweep: Sweep) -> bool:
    """Whether the sweep's trials measure any Hessian quantity (its ``sharpness_measures``).

    >>> sweep = Sweep(name="demo", dataset="digits", model="mlp", epochs=2, batch_size=32, trials=2)
    >>> measures_hessian(sweep), measures_hessian(Sweep(**{**sweep.to_dict(), "fixed": {"sharpness_measures": ""}}))
    (True, False)
    """
    measures = sweep.fixed.get("sharpness_measures", TRIAL_KEYS["sharpness_measures"].default)
    if measures in (None, "default"):
        measures = TRIAL_KEYS["sharpness_measures"].default
    names = measures.split(",") if isinstance(measures, str) else list(measures or ())
    return any(str(name).strip().startswith("hessian") for name in names)


def flatness_config(sweep: Sweep, cell: Cell, name: str, base: dict[str, Any]) -> dict[str, Any]:
    """What a confirmation run of pick ``name`` in ``cell`` sets beyond ``base`` (the cell's
    trial config) to measure the Hessian's top eigenvalues; empty where it measures none.

    >>> sweep = Sweep(name="demo", dataset="digits", model="mlp", epochs=2, batch_size=32, trials=2,
    ...               confirm_seeds=2, ablations={"lr": (0.5,)},
    ...               fixed={"sharpness_settings": {"hessian_top_eig": {"tol": 0.01}, "m_sharpness": {"m": 8}}})
    >>> cell = sweep.cells()[0]
    >>> flatness_config(sweep, cell, "best_sam", sweep.base_config(cell))
    {'sharpness_measures': 'hessian_top_eig', 'sharpness_settings': {'hessian_top_eig': {'tol': 0.01, 'k': 5}}}
    >>> flatness_config(sweep, cell, "sam_baseline", sweep.base_config(cell))
    {}
    """
    if name not in PICKS or not measures_hessian(sweep) or not sweep.ablated(cell):
        return {}
    own = dict((base.get("sharpness_settings") or {}).get(MEASURE) or {})
    return {"sharpness_measures": MEASURE, "sharpness_settings": {MEASURE: {**own, "k": K}}}

"""The MLflow tag names samtune writes on its runs, once: the sweep records them, the report and
the MLflow UI's searches read them.

>>> ROLE_TAG, ROLES[:4]
('samtune.role', ('sweep', 'cell', 'trial', 'lost'))
"""

from __future__ import annotations

#: What a run is in its sweep: one of `ROLES`.
ROLE_TAG = "samtune.role"
ROLES = ("sweep", "cell", "trial", "lost", "confirm", "ablation")
#: The run's key: a sweep's id, a cell's or a trial's key, stable across --resume.
KEY_TAG = "samtune.key"
#: A trial's cell label (e.g. ``noise=0.4``) and its key within the sweep.
CELL_TAG = "samtune.cell"
TRIAL_KEY_TAG = "samtune.trial_key"
#: How a trial ended (`samtune.sweep.tracking.STATUSES`) and a note on it (why it was lost).
STATUS_TAG = "samtune.status"
NOTE_TAG = "samtune.note"
#: Why a failed trial failed: the first line of its error.
ERROR_TAG = "samtune.error"
#: The Ray node id of each of a trial's workers, in rank order.
PLACEMENT_TAG = "samtune.placement"
#: Which sharpness measures a trial's time budget skipped, and why (its latest measurement's).
SHARPNESS_SKIPPED_TAG = "samtune.sharpness_skipped"
#: The sweep run's search space file and sweep id.
SPACE_FILE_TAG = "samtune.space_file"
SWEEP_ID_TAG = "samtune.sweep_id"
#: How the sweep searched: "deterministic (batches of B)" or "asynchronous (depends on timing)".
SEARCH_TAG = "samtune.search"
#: A confirmation run's configuration (best_sgd, best_sam, sam_baseline, or an ablation's:
#: m=<m>, rho=<rho>, lr=x<k>, sgd lr=x<k>) and its seed.
CONFIRMS_TAG = "samtune.confirms"
SEED_TAG = "samtune.seed"
#: An ablation run's setting (m, rho or lr): what its curve is a curve of.
ABLATES_TAG = "samtune.ablates"
#: On a cell's run: picks its confirmation ran once for two names ("sam_baseline:best_sam,...").
ALIASES_TAG = "samtune.aliases"
#: On a cell's run: the search trials it picked, by the trial runs' ``samtune.trial_key``
#: ("best_sgd:<trial_key>,best_sam:<trial_key>"); each pick's run holds its final weights as the
#: MLflow model ``model``.
PICKS_TAG = "samtune.picks"
#: On a cell's run: the artifact holding its picks' Hessian eigenvalue density
#: (``spectral_density.json``, `samtune.sweep.spectra`), where the sweep measured one.
SPECTRAL_DENSITY_TAG = "samtune.spectral_density"
#: Read by the MLflow UI: an experiment of this kind opens on its training runs, not on traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: A run's description in the MLflow UI (markdown).
DESCRIPTION_TAG = "mlflow.note.content"

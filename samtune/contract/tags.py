"""The MLflow tag names samtune writes on its runs, once: the sweep records them, the report and
the MLflow UI's searches read them.

>>> ROLE_TAG, ROLES
('samtune.role', ('sweep', 'cell', 'trial', 'lost'))
"""
from __future__ import annotations

#: What a run is in its sweep: one of `ROLES`.
ROLE_TAG = "samtune.role"
ROLES = ("sweep", "cell", "trial", "lost")
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
#: The sweep run's search space file and sweep id.
SPACE_FILE_TAG = "samtune.space_file"
SWEEP_ID_TAG = "samtune.sweep_id"

"""The trial contract, free of torch: every trial key, every metric and every MLflow tag name, once.

Offers: `TRIAL_KEYS`, `DEFAULTS` and `STUDY_KEYS` (keys), `METRICS` and `OPTIMISABLE` (metrics),
`Setting` and `SpaceError` (values). Kept for samtune's own modules: the MLflow tag names (tags),
the one-line messages with credentials masked (messages), and each module's helpers.
"""

from samtune._lazy import face

__getattr__, __dir__, __all__ = face(__name__)

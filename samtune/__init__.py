"""samtune: when, and how much, does Sharpness-Aware Minimization help?

The public API is small and re-exported here, each name read from its module when first used, so
that `import samtune` stays cheap for a user who only wants the optimizer.

>>> import samtune
>>> samtune.SAM.__module__
'samtune.optim.sam'

Offers: `SAM`, `sam_step`, `fit`, `train_loop_per_worker`, `Sweep`, `load_space`,
`measure_sharpness`, `load_dataset`, `build_model`, `build_scenario`; each package offers more
(its own docstring says what).
"""

from samtune._lazy import face

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = face(__name__)

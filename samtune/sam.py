"""The SAM optimizer and its step, where the README imports them from (``samtune.sam``); they
live in `samtune.optim`.

>>> from samtune.sam import SAM, sam_step
"""

from samtune.optim.sam import SAM
from samtune.optim.step import sam_step

__all__ = ["SAM", "sam_step"]

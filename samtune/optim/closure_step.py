"""`SAM.step(closure)` under a SAM variant: which passes a step takes, and what the variant is told.

A variant's plan for the step says: both passes (SAM), one plain pass (the base optimizer's step,
which LookSAM may reuse a stored direction in), one pass at the momentum-perturbed weights
(MSAM), or, adaptively, SAM only when the gradient's norm says the step needs it. SAMPa's paired
pass needs the previous batch, which a closure cannot give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from samtune.optim.msam import momentum_first_step
from samtune.optim.variants import (
    ADAPTIVE_STEP,
    MOMENTUM_STEP,
    PAIRED_STEP,
    PLAIN_STEP,
    SAM_STEP,
    SAMVariant,
)

if TYPE_CHECKING:
    from samtune.optim.sam import SAM


def closure_step(optimizer: SAM, variant: SAMVariant | None, closure: Callable[[], Tensor]) -> Tensor:
    """One step of `optimizer` with `closure` (called at w, and at w + eps on a two-pass step),
    following `variant` (None: every step both passes). Returns the loss of the first call."""
    plan = variant.plan() if variant is not None else SAM_STEP
    if plan == PAIRED_STEP:
        raise ValueError(
            "sam_variant='sampa' takes a gradient on the previous batch, which a "
            "closure cannot give: train with samtune.optim.step.sam_step"
        )
    if plan == MOMENTUM_STEP:
        momentum_first_step(optimizer)
    with torch.enable_grad():
        loss = closure()
    if variant is not None and plan == MOMENTUM_STEP:
        optimizer._restore_weights()
        optimizer.base_optimizer_step()
        variant.finish(took_sam=False)
        return loss
    if variant is not None and plan == ADAPTIVE_STEP:
        plan = SAM_STEP if variant.decide(float(optimizer.squared_grad_norm())) else PLAIN_STEP
    if variant is not None and plan == PLAIN_STEP:
        if variant.keeps_direction:
            variant.reuse(optimizer.gradients())
        optimizer.base_optimizer_step()
        variant.finish(took_sam=False)
        return loss
    first = optimizer.gradients(clone=True) if variant is not None and variant.keeps_direction else None
    optimizer.first_step(zero_grad=True)
    with torch.enable_grad():
        closure()
    if variant is not None and first is not None:
        variant.store(first, optimizer.gradients())
    optimizer.second_step()
    if variant is not None:
        variant.finish(took_sam=True)
    return loss

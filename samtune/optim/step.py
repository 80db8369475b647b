"""The SAM training step: `sam_step` takes one optimizer step on a batch, with SAM's two passes.

It does what `SAM.step(closure)` leaves to the caller: m-sharpness groups, each worker's own
perturbation under DistributedDataParallel, fp16 loss scaling (unscaled once per step), gradient
clipping, and a cheaper variant's choice between a SAM step and a plain one. How the passes run
on the whole batch or on groups of m examples is `samtune.optim.msharpness`.

BatchNorm running statistics advance once per step, in the first pass. With groups, each group
is normalised by its own batch statistics (as a worker of size m would be), and the running
statistics take one update with the groups' mean statistics.

Variants: MSAM's step is one pass at the momentum-perturbed weights, SAMPa's two independent
passes (on paired workers under DDP, one collective); see `samtune.optim.msam` and
`samtune.optim.sampa`. On a one-pass step the base optimizer steps with the plain gradient
(LookSAM: with the plain gradient plus the reused direction); under DDP that gradient is
all-reduced like any plain step's. AE-SAM's and LookSAM's first pass is the SAM step's first pass, so their SAM steps cost
two passes and their plain steps one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from samtune.optim.msam import momentum_first_step
from samtune.optim.msharpness import (
    LossFn,
    all_reduce_mean,
    backward,
    grouped_sam,
    is_ddp,
    whole_batch_sam,
)
from samtune.optim.sam import SAM
from samtune.optim.sampa import sampa_gradients
from samtune.optim.variants import (
    ADAPTIVE_STEP,
    MOMENTUM_STEP,
    PAIRED_STEP,
    PLAIN_STEP,
    SAM_STEP,
    SAMPa,
    SAMVariant,
    as_variant,
)


def sam_step(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    m: int | None = None,
    *,
    sync_perturbation: bool = False,
    perturbation_group: dist.ProcessGroup | None = None,
    vectorize: bool | None = None,
    max_grad_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    variant: SAMVariant | str | Mapping[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """One training step with SAM's two passes (or one, for a plain optimizer or `rho == 0`).

    Args:
        model: the model, possibly wrapped in `DistributedDataParallel`.
        loss_fn: a mean-reduced loss `loss_fn(logits, targets)`; inputs, targets: the local batch.
        optimizer: a `SAM`, or any other optimizer (then this is a plain step).
        m: m-sharpness group size, a divisor of the local batch: one perturbation per group of
            `m`. `None` or the local batch size: one perturbation from the whole local batch.
        sync_perturbation: under DDP, all-reduce the first gradient too (classic SAM, m = global
            batch). By default each worker perturbs with its own gradient.
        perturbation_group: under DDP, all-reduce the first gradient within this process group
            only (m = k x per-worker batch for k workers). Neither with `m` < the local batch.
        vectorize: for `m` < the batch, run the groups in one `torch.func.vmap` pass (True), one
            after another (False), or by device (None: sequential on CPU, where it measured
            faster, else vmap, falling back to sequential for ops vmap can't batch).
        max_grad_norm: clip the gradient that the base optimizer uses (second pass).
        scaler: an fp16 `GradScaler`: both passes backpropagate the scaled loss (eps is
            normalised, so the scale cancels in it); the gradient is unscaled once per step.
        variant: a cheaper SAM (`samtune.optim.variants`): a `SAMVariant`, a name or a trial
            config, attached to the SAM optimizer on the first call (`SAM.use_variant`). None:
            the optimizer's own (full SAM if none). A plain optimizer accepts only ``"full"``.

    Returns (loss, logits) of the first pass, detached (accuracy without a third forward).
    Raises ValueError for `m` not a positive divisor of the local batch; `m` < the local batch
    with `sync_perturbation`, a `perturbation_group`, ``looksam`` or ``ae_sam``; a variant other
    than ``"full"`` with a plain optimizer, or other than the one the optimizer follows.

    >>> model = nn.Linear(3, 2)
    >>> optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    >>> inputs, targets = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    >>> loss, logits = sam_step(model, nn.functional.cross_entropy, inputs, targets, optimizer, m=4)
    >>> logits.shape, loss.requires_grad
    (torch.Size([8, 2]), False)
    """
    batch = inputs.shape[0]
    m = _check_arguments(optimizer, m, batch, sync_perturbation, perturbation_group, variant)
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    optimizer.zero_grad(set_to_none=True)
    if not (isinstance(optimizer, SAM) and optimizer.takes_two_passes):
        return _one_pass_step(model, loss_fn, inputs, targets, optimizer, base, max_grad_norm, scaler)
    sync, group = sync_perturbation, perturbation_group  # short names keep the call to one line of arguments
    return _sam_optimizer_step(
        model, loss_fn, inputs, targets, optimizer, m, vectorize, max_grad_norm, scaler, sync, group
    )


def _sam_optimizer_step(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    optimizer: SAM,
    m: int,
    vectorize: bool | None,
    max_grad_norm: float | None,
    scaler: torch.amp.GradScaler | None,
    sync_perturbation: bool,
    perturbation_group: dist.ProcessGroup | None,
) -> tuple[Tensor, Tensor]:
    """A SAM optimizer's step, in the form its variant plans: the variant's plain, momentum or
    paired step, else SAM's two passes on the whole local batch or on its groups of `m`."""
    batch = inputs.shape[0]
    base = optimizer.base_optimizer
    chosen = _active_variant(optimizer, m, batch)
    plan = chosen.plan() if chosen is not None else SAM_STEP
    if chosen is not None and plan in (PLAIN_STEP, MOMENTUM_STEP, PAIRED_STEP):
        return _variant_step(model, loss_fn, inputs, targets, optimizer, base, max_grad_norm, scaler, chosen, plan)
    if m == batch:
        loss, logits, took_sam = _whole_batch_step(
            model, loss_fn, inputs, targets, optimizer, scaler, sync_perturbation, perturbation_group, chosen, plan
        )
    else:
        loss, logits = grouped_sam(model, loss_fn, inputs, targets, optimizer, m, vectorize, scaler)
        took_sam = True
    _finish_step(optimizer, base, max_grad_norm, scaler, took_sam, chosen)
    return loss, logits


def _check_arguments(
    optimizer: torch.optim.Optimizer,
    m: int | None,
    batch: int,
    sync_perturbation: bool,
    perturbation_group: dist.ProcessGroup | None,
    variant: SAMVariant | str | Mapping[str, Any] | None,
) -> int:
    """The group size (the local batch for None), after the checks `sam_step` lists; a variant
    given here is attached to a SAM optimizer."""
    m = _check_m(m, batch)
    if m != batch and (sync_perturbation or perturbation_group is not None):
        shared = (
            "sync_perturbation=True (one eps from the whole global batch)"
            if sync_perturbation
            else "perturbation_group (one eps shared by a group of workers)"
        )
        raise ValueError(
            f"{shared} contradicts m={m}, which gives each group of {m} examples of the local "
            f"batch of {batch} its own eps; use m=None (or m={batch}) with it, or drop it"
        )
    if variant is not None:
        if isinstance(optimizer, SAM):
            optimizer.use_variant(variant)
        elif as_variant(variant).name != "full":
            raise ValueError(
                f"sam_variant={as_variant(variant).name!r} chooses between SAM and plain steps, "
                f"so it needs a SAM optimizer (optimizer 'sam' or 'asam'); got "
                f"{type(optimizer).__name__}"
            )
    return m


def _active_variant(optimizer: SAM, m: int, batch: int) -> SAMVariant | None:
    """The variant this step follows; one that decides from the whole batch's gradient refuses
    m-sharpness groups."""
    chosen = optimizer._active_variant()
    if chosen is not None and chosen.uses_whole_batch_gradient and m != batch:
        raise ValueError(
            f"sam_variant={chosen.name!r} {chosen.whole_batch_reason}, so it does not combine "
            f"with m-sharpness groups (m={m} < local batch {batch}); use m=None or the variants "
            f"every_k / rst"
        )
    return chosen


def _one_pass_step(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    base: torch.optim.Optimizer,
    max_grad_norm: float | None,
    scaler: torch.amp.GradScaler | None,
    chosen: SAMVariant | None = None,
) -> tuple[Tensor, Tensor]:
    """A step with the plain gradient: a plain optimizer, `rho == 0`, or a variant's plain step
    (`chosen`, which LookSAM adds its stored direction to)."""
    logits = model(inputs)
    loss = loss_fn(logits, targets)
    backward(loss, scaler)
    if chosen is not None and chosen.keeps_direction and isinstance(optimizer, SAM):
        chosen.reuse(optimizer.gradients())
    _finish_step(optimizer, base, max_grad_norm, scaler, took_sam=False, variant=chosen)
    return loss.detach(), logits.detach()


def _variant_step(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    optimizer: SAM,
    base: torch.optim.Optimizer,
    max_grad_norm: float | None,
    scaler: torch.amp.GradScaler | None,
    chosen: SAMVariant,
    plan: str,
) -> tuple[Tensor, Tensor]:
    """A variant's plain step; MSAM's one pass at the momentum-perturbed weights
    (`samtune.optim.msam`); or SAMPa's two independent gradients (`samtune.optim.sampa`). Each
    ends with the base optimizer's step from w."""
    if plan == MOMENTUM_STEP:
        momentum_first_step(optimizer)
    if plan in (PLAIN_STEP, MOMENTUM_STEP):
        # Weights restored by `_finish_step`, before the base optimizer steps.
        return _one_pass_step(model, loss_fn, inputs, targets, optimizer, base, max_grad_norm, scaler, chosen)
    if scaler is not None:
        raise ValueError(
            "sam_variant='sampa' keeps the auxiliary gradient from one step to the next, "
            "which fp16 loss scaling would rescale or skip: use precision 'bf16' or 'fp32'"
        )
    if not isinstance(chosen, SAMPa):
        raise TypeError(f"a paired step is SAMPa's, got {chosen!r}")
    loss, logits = sampa_gradients(model, loss_fn, inputs, targets, optimizer, chosen)
    _finish_step(optimizer, base, max_grad_norm, None, took_sam=True, variant=chosen)
    return loss, logits


def _whole_batch_step(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    optimizer: SAM,
    scaler: torch.amp.GradScaler | None,
    sync_perturbation: bool,
    perturbation_group: dist.ProcessGroup | None,
    chosen: SAMVariant | None,
    plan: str,
) -> tuple[Tensor, Tensor, bool]:
    """Both passes on the whole local batch, with AE-SAM's decision or LookSAM's stored direction
    between them. Returns (loss, logits, whether the second pass ran)."""
    between = None
    if chosen is not None and (plan == ADAPTIVE_STEP or chosen.keeps_direction):
        between = _VariantFirstPass(
            chosen,
            optimizer,
            adaptive=plan == ADAPTIVE_STEP,
            local=is_ddp(model) and not sync_perturbation,
            scaler=scaler,
        )
    loss, logits, took_sam = whole_batch_sam(
        model, loss_fn, inputs, targets, optimizer, scaler, sync_perturbation, perturbation_group, between
    )
    if between is not None and between.first is not None:
        between.variant.store(between.first, optimizer.gradients())
    return loss, logits, took_sam


class _VariantFirstPass:
    """What AE-SAM and LookSAM do between the first pass and the perturbation.

    AE-SAM: decide from ||g||^2 whether to go on to the second pass (under DDP the workers' mean
    of their local ||g||^2, so all decide alike; if not, the local gradients are all-reduced for
    the plain step). LookSAM: keep g (averaged over the workers) for `store` after the second
    pass. Called with the first pass's gradients in `.grad`; returns whether to take the second.
    """

    def __init__(
        self, variant: SAMVariant, optimizer: SAM, adaptive: bool, local: bool, scaler: torch.amp.GradScaler | None
    ) -> None:
        self.variant, self.optimizer, self.adaptive = variant, optimizer, adaptive
        self.local = local  # the first pass ran in no_sync(): gradients are this worker's own
        self.scaler = scaler
        self.first: list[Tensor | None] | None = None

    def __call__(self) -> bool:
        optimizer = self.optimizer
        if self.adaptive:
            squared = optimizer.squared_grad_norm()
            if self.local:
                squared = all_reduce_mean([squared], None)[0]
            if self.scaler is not None:
                # The gradients carry the loss scale; the rule is about the true gradient.
                squared = squared / float(self.scaler.get_scale()) ** 2
            # One host sync per step: the decision branches the computation.
            if not self.variant.decide(float(squared)):
                if self.local:
                    all_reduce_mean([g for g in optimizer.gradients() if g is not None], None)
                return False
        if self.variant.keeps_direction:
            self.first = optimizer.gradients(clone=True)
            if self.local:
                all_reduce_mean([g for g in self.first if g is not None], None)
        return True


def _check_m(m: int | None, batch: int) -> int:
    if m is None:
        return batch
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ValueError(f"m (the m-sharpness group size) must be a positive integer, got m={m!r}")
    if m > batch or batch % m:
        raise ValueError(
            f"m={m} must divide the local batch size {batch} (each worker's batch is cut into "
            f"groups of m examples); choose a divisor of {batch}"
        )
    return m


def _finish_step(
    optimizer: torch.optim.Optimizer,
    base: torch.optim.Optimizer,
    max_grad_norm: float | None,
    scaler: torch.amp.GradScaler | None,
    took_sam: bool,
    variant: SAMVariant | None = None,
) -> None:
    """Clip and step with the gradient of the last pass (unscaled exactly once), then count the
    step in the variant's schedule."""
    if scaler is not None:
        scaler.unscale_(base)
    if max_grad_norm is not None:
        params = [p for g in base.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if isinstance(optimizer, SAM):
        if scaler is not None:
            # The scaler steps the base optimizer (skipping it on overflow); restore w first.
            optimizer._restore_weights()
            scaler.step(base)
            optimizer._opt_called = True
        elif not took_sam:
            optimizer._restore_weights()  # MSAM's one pass ran at w + eps; a plain step's at w
            optimizer.base_optimizer_step()
        else:
            optimizer.second_step()
    elif scaler is not None:
        scaler.step(base)
    else:
        base.step()
    if scaler is not None:
        scaler.update()
    if variant is not None:
        variant.finish(took_sam=took_sam)

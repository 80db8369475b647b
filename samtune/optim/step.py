"""Sharpness-Aware Minimization as a `torch.optim` optimizer, and the training step that owns SAM's
two passes, m-sharpness included.

Follows Foret et al. 2020, "Sharpness-Aware Minimization for Efficiently Improving
Generalization" (arXiv 2010.01412) and, for `adaptive=True`, Kwon et al. 2021, "ASAM" (arXiv
2102.11600):

    eps = rho * g / ||g||_2                          (SAM)
    eps = rho * T^2 g / ||T g||_2,  T = |w| + eta    (ASAM)

then the base optimizer updates `w` with the gradient taken at `w + eps`.

m-sharpness (Foret et al., section 4.1): the batch is cut into disjoint groups of `m` examples,
each group gets its own `eps` from its own gradient, and the second-pass gradients are averaged.
Under `DistributedDataParallel` the first pass runs inside `no_sync()`, so every worker perturbs
with its own gradient (m = per-worker batch) at no extra communication; only the second pass
all-reduces.

Cheaper variants (`samtune.variants`: ``every_k``, ``rst``, ``looksam``, ``ae_sam``) decide per
step whether to pay for the second pass; pass one as `SAM(..., variant=...)` or
`sam_step(..., variant=...)`. The module docstring of `samtune.variants` gives each rule and the
trial-config keys (``sam_variant``, ``sam_k``, ``sam_p``, ``looksam_alpha``, ...).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from samtune.optim.msharpness import (
    _all_reduce_mean,
    _backward,
    _grouped_sam,
    _is_ddp,
    _whole_batch_sam,
)
from samtune.optim.sam import SAM
from samtune.optim.variants import (
    ADAPTIVE_STEP,
    PLAIN_STEP,
    SAM_STEP,
    SAMVariant,
    _as_variant,
)

# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------


def sam_step(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    m: int | None = None,
    *,
    sync_perturbation: bool = False,
    perturbation_group: "dist.ProcessGroup | None" = None,
    vectorize: bool | None = None,
    max_grad_norm: float | None = None,
    scaler: "torch.amp.GradScaler | None" = None,
    variant: "SAMVariant | str | Mapping[str, Any] | None" = None,
) -> tuple[Tensor, Tensor]:
    """One training step with SAM's two passes (or one, for a plain optimizer or `rho == 0`).

    Args:
        model: the model, possibly wrapped in `DistributedDataParallel`.
        loss_fn: a mean-reduced loss `loss_fn(logits, targets)`.
        inputs, targets: the local (per-worker) batch.
        optimizer: a `SAM`, or any other optimizer (then this is a plain step).
        m: m-sharpness group size. `None` or the local batch size: one perturbation from the
            whole local batch. A divisor of the local batch: one perturbation per group of `m`.
        sync_perturbation: under DDP, all-reduce the first gradient too (classic SAM with
            m = global batch). By default each worker perturbs with its own gradient. Not with
            `m` smaller than the local batch (that asks for one eps per group instead).
        perturbation_group: under DDP, all-reduce the first gradient within this process group
            only (m = k x per-worker batch for a group of k workers). Not with `m` smaller than
            the local batch either.
        vectorize: for `m` smaller than the batch, run the groups in one batched pass with
            `torch.func.vmap` (True), one after another (False), or choose by device (None):
            the sequential path on CPU, where it measured faster (benchmarks/sam_step.py), and
            vmap on accelerators, falling back to the sequential path for ops vmap can't batch.
        max_grad_norm: clip the gradient that the base optimizer uses (second pass).
        scaler: an fp16 `GradScaler`. Both passes backpropagate the scaled loss, so fp16
            gradients do not underflow in either; scaling doesn't change eps (it is normalised),
            and the gradient is unscaled once per step, on the base optimizer, so SAM's two passes
            do not trip "unscale_() has already been called".
        variant: a cheaper SAM (`samtune.variants`): a `SAMVariant`, a variant name, or a trial
            config with ``sam_variant`` and its knobs. It is attached to the SAM optimizer on the
            first call (`SAM.use_variant`) and its state lives there; later calls may pass the
            same rule again or nothing. None: the optimizer's own variant (full SAM if none).
            With a plain optimizer only ``"full"`` is accepted (and means a plain step).

    Returns:
        (loss, logits) of the first pass, detached, so the caller can log accuracy without a
        third forward.

    BatchNorm running statistics advance once per step, in the first pass. With groups, each
    group is normalised by its own batch statistics (as a worker of size m would be), and the
    running statistics take one update with the groups' mean statistics.

    Variants: on a one-pass step the base optimizer steps with the plain gradient (LookSAM: with
    the plain gradient plus the reused direction); under DDP that gradient is all-reduced like
    any plain step's. AE-SAM's and LookSAM's first pass is the SAM step's first pass, so their
    SAM steps cost two passes and their plain steps one.

    Raises:
        ValueError: `m <= 0`, or `m` not dividing the local batch size; `m` smaller than the
            local batch together with `sync_perturbation=True` or a `perturbation_group`; a
            variant other than ``"full"`` with a non-SAM optimizer; ``looksam``/``ae_sam`` with
            `m` smaller than the local batch; a variant that differs from the one the optimizer
            already follows.
    """
    batch = inputs.shape[0]
    m = _check_m(m, batch)
    if m != batch and (sync_perturbation or perturbation_group is not None):
        shared = ("sync_perturbation=True (one eps from the whole global batch)" if sync_perturbation
                  else "perturbation_group (one eps shared by a group of workers)")
        raise ValueError(
            f"{shared} contradicts m={m}, which gives each group of {m} examples of the local "
            f"batch of {batch} its own eps; use m=None (or m={batch}) with it, or drop it")
    if variant is not None:
        if isinstance(optimizer, SAM):
            optimizer.use_variant(variant)
        elif _as_variant(variant).name != "full":
            raise ValueError(
                f"sam_variant={_as_variant(variant).name!r} chooses between SAM and plain steps, "
                f"so it needs a SAM optimizer (optimizer 'sam' or 'asam'); got "
                f"{type(optimizer).__name__}")
    is_sam = isinstance(optimizer, SAM) and optimizer.takes_two_passes
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    optimizer.zero_grad(set_to_none=True)

    if not is_sam:
        logits = model(inputs)
        loss = loss_fn(logits, targets)
        _backward(loss, scaler)
        _finish_step(optimizer, base, max_grad_norm, scaler, plain=True)
        return loss.detach(), logits.detach()

    chosen = optimizer._active_variant()
    if chosen is not None and chosen.uses_whole_batch_gradient and m != batch:
        raise ValueError(
            f"sam_variant={chosen.name!r} decides from the whole local batch's gradient, so it "
            f"does not combine with m-sharpness groups (m={m} < local batch {batch}); use m=None "
            f"or the variants every_k / rst")
    plan = chosen.plan() if chosen is not None else SAM_STEP

    if plan == PLAIN_STEP:
        logits = model(inputs)
        loss = loss_fn(logits, targets)
        _backward(loss, scaler)
        if chosen.keeps_direction:
            chosen.reuse(optimizer.gradients())
        _finish_step(optimizer, base, max_grad_norm, scaler, plain=True)
        chosen.finish(took_sam=False)
        return loss.detach(), logits.detach()

    took_sam = True
    if m == batch:
        between = None
        if plan == ADAPTIVE_STEP or (chosen is not None and chosen.keeps_direction):
            between = _VariantFirstPass(chosen, optimizer, adaptive=plan == ADAPTIVE_STEP,
                                        local=_is_ddp(model) and not sync_perturbation, scaler=scaler)
        loss, logits, took_sam = _whole_batch_sam(model, loss_fn, inputs, targets, optimizer, scaler,
                                                  sync_perturbation, perturbation_group, between)
        if between is not None and between.first is not None:
            chosen.store(between.first, optimizer.gradients())
    else:
        loss, logits = _grouped_sam(model, loss_fn, inputs, targets, optimizer, m, vectorize, scaler)
    _finish_step(optimizer, base, max_grad_norm, scaler, plain=not took_sam)
    if chosen is not None:
        chosen.finish(took_sam=took_sam)
    return loss, logits




class _VariantFirstPass:
    """What AE-SAM and LookSAM do between the first pass and the perturbation.

    AE-SAM: decide from ||g||^2 whether to go on to the second pass (under DDP the workers' mean
    of their local ||g||^2, so all decide alike; if not, the local gradients are all-reduced for
    the plain step). LookSAM: keep g (averaged over the workers) for `store` after the second
    pass. Called with the first pass's gradients in `.grad`; returns whether to take the second.
    """

    def __init__(self, variant: SAMVariant, optimizer: SAM, adaptive: bool, local: bool,
                 scaler) -> None:
        self.variant, self.optimizer, self.adaptive = variant, optimizer, adaptive
        self.local = local  # the first pass ran in no_sync(): gradients are this worker's own
        self.scaler = scaler
        self.first: list[Tensor | None] | None = None

    def __call__(self) -> bool:
        optimizer = self.optimizer
        if self.adaptive:
            squared = optimizer.squared_grad_norm()
            if self.local:
                squared = _all_reduce_mean([squared], None)[0]
            if self.scaler is not None:
                # The gradients carry the loss scale; the rule is about the true gradient.
                squared = squared / float(self.scaler.get_scale()) ** 2
            # One host sync per step: the decision branches the computation.
            if not self.variant.decide(float(squared)):
                if self.local:
                    _all_reduce_mean([g for g in optimizer.gradients() if g is not None], None)
                return False
        if self.variant.keeps_direction:
            self.first = optimizer.gradients(clone=True)
            if self.local:
                _all_reduce_mean([g for g in self.first if g is not None], None)
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


def _finish_step(optimizer, base, max_grad_norm, scaler, plain: bool) -> None:
    """Clip and step with the gradient of the last pass; unscale exactly once."""
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
            optimizer._opt_called = True  # type: ignore[attr-defined]
        elif plain:
            optimizer.base_optimizer_step()
        else:
            optimizer.second_step()
    elif scaler is not None:
        scaler.step(base)
    else:
        base.step()
    if scaler is not None:
        scaler.update()

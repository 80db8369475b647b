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

import contextlib
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .variants import ADAPTIVE_STEP, PLAIN_STEP, SAM_STEP, SAMVariant, make_variant, variant_from_config

__all__ = ["SAM", "sam_step"]

# Keeps eps finite when a gradient is exactly zero (e.g. a dead network); small against any real
# gradient norm.
_NORM_FLOOR = 1e-12


class SAM(torch.optim.Optimizer):
    """SAM / ASAM around any base optimizer.

    Args:
        params: parameters or parameter groups, as for any optimizer. Groups may set their own
            `rho` and `adaptive`; every other key is the base optimizer's (lr, momentum, ...).
        base_optimizer: the optimizer class that takes the actual step (`torch.optim.SGD` ...).
        rho: radius of the perturbation ball, >= 0. `rho == 0` is exactly the base optimizer.
        adaptive: ASAM, the ball is scaled by `|w| + eta` per coordinate.
        eta: ASAM's offset that keeps zero weights perturbable, > 0.
        perturb_weight_decay: whether the ascent direction includes the weight-decay term
            `weight_decay * w`. Off by default: the base optimizer applies weight decay, and the
            perturbation follows the data loss only (as in Foret et al.'s implementation).
        variant: which steps take the second pass: a `samtune.variants.SAMVariant`, a variant
            name (default knobs) or a trial config (`variant_from_config`). None: every step,
            as ``"full"``. `step(closure)` and `sam_step` both follow it.
        **base_kwargs: passed to `base_optimizer`.

    The base optimizer shares `param_groups` with this object, so LR schedulers attached to the
    SAM optimizer drive the base one. `state_dict()` is the base optimizer's state plus the
    groups' `rho`/`adaptive`, plus the variant's state under ``"sam_variant"`` (its step count,
    random stream, running statistics, LookSAM's stored direction) so that a resumed run follows
    the same schedule; the perturbation itself only lives between `first_step` and
    `second_step` and is not saved.

    Raises:
        ValueError: `rho < 0`, or `eta <= 0` with `adaptive=True` (for the defaults or any group,
            here or in `add_param_group`), or a bad variant (see `samtune.variants`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        perturb_weight_decay: bool = False,
        variant: "SAMVariant | str | Mapping[str, Any] | None" = None,
        **base_kwargs,
    ) -> None:
        _check_group_settings({"rho": rho, "adaptive": adaptive, "eta": eta}, where="")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD, "
                f"got {base_optimizer!r}"
            )
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        # Every group, the constructor's included, goes through `add_param_group`, which checks it.
        super().__init__(params, defaults)
        self.perturb_weight_decay = perturb_weight_decay
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of dicts for both: schedulers and users edit it once.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # (params, saved w) of each group that `first_step` moved this step: exactly these go back
        # to w. A parameter without a gradient this step keeps whatever the base optimizer left.
        self._perturbed: list[tuple[list[Tensor], list[Tensor]]] = []
        self.variant: SAMVariant | None = None
        # A checkpoint's variant state loaded before the variant is known (a trainer that
        # restores the optimizer first and passes the variant to sam_step afterwards).
        self._pending_variant_state: dict | None = None
        if variant is not None:
            self.use_variant(variant)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group, as for any optimizer; it may set its own `rho`, `adaptive` and `eta`.

        Raises:
            ValueError: the group's `rho < 0`, or `eta <= 0` with `adaptive=True`.
        """
        if not isinstance(param_group, dict):
            raise ValueError(f"a parameter group must be a dict with 'params', got "
                             f"{type(param_group).__name__}")
        for key in ("rho", "adaptive", "eta"):
            param_group.setdefault(key, self.defaults[key])
        _check_group_settings(param_group, where=f"parameter group {len(self.param_groups)}: ")
        base = getattr(self, "base_optimizer", None)
        if base is None:  # still in __init__: the base optimizer adopts these groups next
            super().add_param_group(param_group)
        else:  # the list is shared, so the base optimizer steps the new group too
            base.add_param_group(param_group)

    # -- the algorithm ---------------------------------------------------------------------

    @property
    def takes_two_passes(self) -> bool:
        """False when every group has `rho == 0`: then SAM is the base optimizer, one pass."""
        return any(group["rho"] > 0 for group in self.param_groups)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, loss_scale: float | Tensor = 1.0) -> None:
        """Move every parameter with a gradient from `w` to `w + eps` (global L2 norm).

        `loss_scale`: the factor the gradients carry (a `GradScaler`'s scale, a number or a
        0-dim tensor, when the loss was scaled). eps is normalised, so it cancels; it only matters
        for the weight-decay term of `perturb_weight_decay=True`, added in the gradients' units.

        A non-finite gradient norm (an fp16 overflow) gives eps = 0: the weights stay at `w` and
        the step is the base optimizer's (which a `GradScaler` then skips).
        """
        groups = self._groups_with_grads()
        if not groups:
            return
        directions = [self._ascent_direction(group, params, loss_scale) for group, params in groups]
        # One norm over all groups, as in the paper; one device sync at most, no .item().
        norms = [n for scaled in directions for n in torch._foreach_norm(scaled)]
        device = norms[0].device
        grad_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        # Decided on the device, not with a host sync: a non-finite norm makes the scale 0, and
        # nan_to_num_ below turns the inf * 0 = nan that leaves into 0. With a finite norm every
        # entry is finite and nan_to_num_ changes nothing. (A masked_fill_ with the 0-dim mask
        # measured 10x slower: it added a fifth to a SAM step's optimizer work on an MLP.)
        finite = torch.isfinite(grad_norm)
        perturbed = []
        for (group, params), scaled in zip(groups, directions):
            saved, eps = self._buffers(params)
            torch._foreach_copy_(saved, params)
            # eps = rho * T * (T g) / ||T g||; with T = 1 this is rho * g / ||g||.
            scale = torch.where(finite, group["rho"] / (grad_norm + _NORM_FLOOR), 0.0)
            torch._foreach_copy_(eps, scaled)
            if group["adaptive"]:
                torch._foreach_mul_(eps, self._adaptive_scale(group, params))
            torch._foreach_mul_(eps, [scale.to(p.device) for p in params])
            for e in eps:
                e.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_add_(params, eps)
            perturbed.append((params, saved))
        self._perturbed = perturbed
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to `w` exactly (restored, not subtracted) and let the base optimizer step with
        the gradient taken at `w + eps`. Only the parameters that `first_step` moved are
        restored."""
        self._restore_weights()
        self.base_optimizer.step()
        # LR schedulers check this flag, which their wrapper of `step()` sets; SAM steps through
        # `second_step`, so it says the same thing here.
        self._opt_called = True  # type: ignore[attr-defined]
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """The full SAM step, like any PyTorch optimizer.

        `closure` must zero the gradients, compute the loss, call `backward()` and return the
        loss; it is called at `w` and again at `w + eps`. The loss at `w` is returned. Without a
        closure only the base step is possible, which is what `rho == 0` means. With a variant,
        the closure is called once on the variant's one-pass steps.

        The closure's forward runs in whatever mode the model is in, so on a two-pass step a
        model in train mode advances its BatchNorm running statistics twice (once at `w`, once at
        `w + eps`). `samtune.sam_step` runs the second pass with the statistics frozen, so they
        advance once per step; use it for models with BatchNorm.

        Raises:
            ValueError: no closure while some group has `rho > 0`.
        """
        if not self.takes_two_passes:
            return self.base_optimizer_step(closure)
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure (zero_grad, forward, backward, return loss) when "
                "rho > 0: the gradient at w + eps is a second pass. Or call first_step() and "
                "second_step() around your own second pass, or use samtune.sam_step()."
            )
        variant = self._active_variant()
        plan = variant.plan() if variant is not None else SAM_STEP
        with torch.enable_grad():
            loss = closure()
        if plan == ADAPTIVE_STEP:
            plan = SAM_STEP if variant.decide(float(self.squared_grad_norm())) else PLAIN_STEP
        if plan == PLAIN_STEP:
            if variant.keeps_direction:
                variant.reuse(self.gradients())
            self.base_optimizer_step()
            variant.finish(took_sam=False)
            return loss
        first = self.gradients(clone=True) if variant is not None and variant.keeps_direction else None
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        if first is not None:
            variant.store(first, self.gradients())
        self.second_step()
        if variant is not None:
            variant.finish(took_sam=True)
        return loss

    # -- variants --------------------------------------------------------------------------

    def use_variant(self, variant: "SAMVariant | str | Mapping[str, Any]") -> SAMVariant:
        """Follow `variant` from now on (a `SAMVariant`, a name, or a trial config) and return it.

        The first call attaches it (and resumes it from a loaded checkpoint, if any); later calls
        with the same rule (same name and knobs) keep the attached one and its state, so a
        training loop may pass the same config every step.

        Raises:
            ValueError: a different rule than the attached one, a checkpoint of another rule,
                or bad knobs.
        """
        new = _as_variant(variant)
        current = self.variant
        if current is None:
            if self._pending_variant_state is not None:
                new.load_state_dict(self._pending_variant_state)
                self._pending_variant_state = None
            self.variant = new
        elif new is not current and (new.name, new.settings()) != (current.name, current.settings()):
            raise ValueError(f"this optimizer already follows {current!r}; a run keeps one SAM "
                             f"variant (got {new!r}): build a new SAM optimizer to change it")
        return self.variant

    def _active_variant(self) -> SAMVariant | None:
        if self.variant is None and self._pending_variant_state is not None:
            name = self._pending_variant_state.get("name")
            if name != "full":
                raise ValueError(f"the loaded checkpoint follows sam_variant={name!r}; pass the same "
                                 f"variant (SAM(variant=...) or sam_step(variant=...)) to resume it")
        return self.variant

    def gradients(self, clone: bool = False) -> list[Tensor | None]:
        """Every parameter's `.grad` (None where there is none), in `param_groups` order."""
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        return [None if g is None else g.clone() for g in grads] if clone else grads

    @torch.no_grad()
    def squared_grad_norm(self) -> Tensor:
        """||g||^2 over every parameter's `.grad` together (float64, on the first grad's device)."""
        grads = [g for g in self.gradients() if g is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        norms = torch._foreach_norm(grads)
        device = norms[0].device
        return torch.stack([n.to(device, torch.float64) for n in norms]).square().sum()

    def base_optimizer_step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One plain step of the base optimizer (the `rho == 0` path): bit-identical to it."""
        loss = self.base_optimizer.step(closure)
        self._opt_called = True  # type: ignore[attr-defined]
        return loss

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = self.base_optimizer.state_dict()
        if self.variant is not None:
            state["sam_variant"] = self.variant.state_dict()
        elif self._pending_variant_state is not None:
            state["sam_variant"] = self._pending_variant_state
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        variant_state = state_dict.pop("sam_variant", None)
        self.base_optimizer.load_state_dict(state_dict)
        if variant_state is not None:
            if self.variant is not None:
                self.variant.load_state_dict(variant_state)
            else:
                self._pending_variant_state = variant_state
        # The base optimizer rebuilt its group dicts; share them again.
        self.param_groups = self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # -- helpers ---------------------------------------------------------------------------

    @torch.no_grad()
    def _restore_weights(self) -> None:
        """Put back `w` for exactly the parameters the last `first_step` moved."""
        for params, saved in self._perturbed:
            torch._foreach_copy_(params, saved)
        self._perturbed = []

    def _groups_with_grads(self) -> list[tuple[dict, list[Tensor]]]:
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                out.append((group, params))
        return out

    def _ascent_direction(self, group: dict, params: list[Tensor],
                          loss_scale: float | Tensor = 1.0) -> list[Tensor]:
        """T g: the ascent direction whose norm normalises eps (T = 1 unless adaptive)."""
        grads = [p.grad for p in params]
        if self.perturb_weight_decay and group.get("weight_decay", 0):
            # The gradients carry `loss_scale`; the decay term must carry it too.
            # (The scale is a float32 tensor: multiplied last, it rounds nothing in w * wd.)
            decayed = torch._foreach_mul(params, group["weight_decay"])
            if not (isinstance(loss_scale, float) and loss_scale == 1.0):
                torch._foreach_mul_(decayed, loss_scale)
            torch._foreach_add_(decayed, grads)
            grads = decayed
        if group["adaptive"]:
            return torch._foreach_mul(grads, self._adaptive_scale(group, params))
        return grads

    @staticmethod
    def _adaptive_scale(group: dict, params: list[Tensor]) -> list[Tensor]:
        scale = torch._foreach_abs(params)
        torch._foreach_add_(scale, group["eta"])
        return scale

    def _buffers(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per-parameter buffers for `w` and `eps`, allocated once and reused every step."""
        saved, eps = [], []
        for p in params:
            state = self.state[p]
            if "sam_w" not in state:
                state["sam_w"] = torch.empty_like(p, memory_format=torch.preserve_format)
                state["sam_eps"] = torch.empty_like(p, memory_format=torch.preserve_format)
            saved.append(state["sam_w"])
            eps.append(state["sam_eps"])
        return saved, eps


def _check_group_settings(group: Mapping[str, Any], where: str) -> None:
    """SAM's own keys of a group (or of the defaults); `where` prefixes the message."""
    rho, adaptive, eta = group["rho"], group["adaptive"], group["eta"]
    if not _is_number(rho) or not rho >= 0:
        raise ValueError(f"{where}rho must be a number >= 0 (the radius of the SAM ball), got rho={rho!r}")
    if not isinstance(adaptive, bool):
        raise ValueError(f"{where}adaptive must be True (ASAM) or False (SAM), got adaptive={adaptive!r}")
    if adaptive and not (_is_number(eta) and eta > 0):
        raise ValueError(f"{where}eta must be > 0 for adaptive SAM (ASAM), got eta={eta!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def _as_variant(variant: "SAMVariant | str | Mapping[str, Any]") -> SAMVariant:
    if isinstance(variant, SAMVariant):
        return variant
    if isinstance(variant, str):
        return make_variant(variant)
    if isinstance(variant, Mapping):
        return variant_from_config(variant)
    raise ValueError(f"variant must be a SAMVariant, a variant name or a trial config dict, "
                     f"got {type(variant).__name__}")


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


def _backward(loss: Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _loss_scale(scaler, device: torch.device) -> Tensor | float:
    """The factor a scaled loss carries: a 0-dim tensor on the device (no host sync), or 1.0."""
    if scaler is None:
        return 1.0
    # Scaling a one also sets up a scaler that has not scaled anything yet (the grouped path's
    # first step), which its unscale_() requires.
    return scaler.scale(torch.ones((), device=device))


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


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _whole_batch_sam(model, loss_fn, inputs, targets, optimizer: SAM, scaler,
                     sync_perturbation: bool, perturbation_group,
                     between: Callable[[], bool] | None = None) -> tuple[Tensor, Tensor, bool]:
    """Both passes on the whole local batch; `between` (a variant's hook) runs after the first
    pass and may stop there. Returns (loss, logits, whether the second pass ran)."""
    ddp = _is_ddp(model)
    # The forward must sit inside no_sync() too: DDP decides at forward time whether the
    # backward all-reduces.
    local = model.no_sync() if ddp and not sync_perturbation else contextlib.nullcontext()
    with local:
        logits = model(inputs)
        loss = loss_fn(logits, targets)
        _backward(loss, scaler)
    if ddp and perturbation_group is not None and not sync_perturbation:
        _all_reduce_grads(optimizer, perturbation_group)
    if between is not None and not between():
        return loss.detach(), logits.detach(), False
    optimizer.first_step(zero_grad=True, loss_scale=_loss_scale(scaler, inputs.device))
    with _frozen_norm_stats(model):
        _backward(loss_fn(model(inputs), targets), scaler)
    return loss.detach(), logits.detach(), True


# -- BatchNorm statistics ----------------------------------------------------------------------


def _norm_buffers(module: nn.Module) -> list[Tensor]:
    return [
        b
        for mod in module.modules()
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats
        for b in (mod.running_mean, mod.running_var, mod.num_batches_tracked)
        if b is not None
    ]


@contextlib.contextmanager
def _frozen_norm_stats(model: nn.Module):
    """Run a pass without advancing BatchNorm running statistics (restored exactly after)."""
    buffers = _norm_buffers(model)
    if not buffers:
        yield
        return
    with torch.no_grad():
        snapshot = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(buffers, snapshot)


# -- m-sharpness: groups of m examples --------------------------------------------------------


def _vmap_by_default(device: torch.device) -> bool:
    # On CPU the batched per-group weights cost more memory traffic than they save in kernel
    # launches (m=16 of 128: 1.3x slower on ResNet-20, 2x on an MLP).
    return device.type != "cpu"


def _grouped_sam(model, loss_fn, inputs, targets, optimizer: SAM, m: int, vectorize,
                 scaler) -> tuple[Tensor, Tensor]:
    """Each group of m gets its own eps; the base step uses the mean of the groups' gradients
    at their own perturbed weights. Runs on the unwrapped module and all-reduces by hand under
    DDP (one flattened round), since DDP's hooks only see its own forward."""
    module = model.module if _is_ddp(model) else model
    groups = inputs.shape[0] // m
    xg = inputs.reshape(groups, m, *inputs.shape[1:])
    yg = targets.reshape(groups, m, *targets.shape[1:])
    loss_scale = _loss_scale(scaler, inputs.device)
    if vectorize is None and not _vmap_by_default(inputs.device):
        vectorize = False
    if vectorize is not False:
        try:
            result = _grouped_vmap(module, loss_fn, xg, yg, optimizer, loss_scale)
        except Exception:  # an op without a batching rule: take the sequential path
            if vectorize:
                raise
            # _grouped_vmap changes the module's state (BatchNorm statistics) only once it has
            # succeeded, so the loop starts from the same state; only partial gradients remain.
            optimizer.zero_grad(set_to_none=True)
            result = _grouped_loop(module, loss_fn, xg, yg, optimizer, loss_scale)
    else:
        result = _grouped_loop(module, loss_fn, xg, yg, optimizer, loss_scale)
    if _is_ddp(model):
        _all_reduce_grads(optimizer, None)
    return result


def _sam_params(optimizer: SAM, module: nn.Module) -> tuple[dict[str, Tensor], list[dict]]:
    """The module's trainable parameters by name, and the SAM group settings for each."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = {n: p for n, p in module.named_parameters() if p.requires_grad and id(p) in group_of}
    return named, [group_of[id(p)] for p in named.values()]


def _group_eps(grads: list[Tensor], params: list[Tensor], settings: list[dict],
               optimizer: SAM, loss_scale: float | Tensor = 1.0) -> list[Tensor]:
    """eps per group from per-group gradients stacked on dim 0: [G, *p.shape] each. The
    gradients may carry `loss_scale` (see `SAM.first_step`)."""
    groups = grads[0].shape[0]
    directions = []
    for g, p, s in zip(grads, params, settings):
        if optimizer.perturb_weight_decay and s.get("weight_decay", 0):
            g = g + s["weight_decay"] * p.detach() * loss_scale
        if s["adaptive"]:
            t = p.detach().abs() + s["eta"]
            directions.append((g * t, t))
        else:
            directions.append((g, None))
    norm_sq = sum(d.reshape(groups, -1).pow(2).sum(1) for d, _ in directions)
    norm = norm_sq.sqrt()
    # A group whose norm is not finite (an fp16 overflow) gets eps = 0, chosen on the device;
    # the where() is needed because its direction holds inf/nan, and inf * 0 = nan.
    finite = torch.isfinite(norm)
    eps = []
    for (d, t), s in zip(directions, settings):
        shape = (groups, *([1] * (d.dim() - 1)))
        e = d * (s["rho"] / (norm + _NORM_FLOOR)).reshape(shape)
        if t is not None:
            e = e * t
        eps.append(torch.where(finite.reshape(shape), e, 0.0))
    return eps


def _grouped_vmap(module, loss_fn, xg, yg, optimizer: SAM, loss_scale) -> tuple[Tensor, Tensor]:
    named, settings = _sam_params(optimizer, module)
    names = list(named)
    params = [named[n].detach() for n in names]
    frozen = {n: p.detach() for n, p in module.named_parameters() if n not in named}
    buffers = dict(module.named_buffers())
    groups = xg.shape[0]
    norm_names = [n for n, b in buffers.items() if _is_norm_stat(module, n)]

    def group_loss(trainable, group_buffers, x, y):
        out = functional_call(module, ({**trainable, **frozen}, {**buffers, **group_buffers}), (x,))
        return loss_fn(out, y), (out, group_buffers)

    def scaled_group_loss(trainable, group_buffers, x, y):
        # The gradient of the scaled loss, as the second pass's, so fp16 gradients don't
        # underflow; eps is normalised, so the scale cancels in it.
        loss, (out, new) = group_loss(trainable, group_buffers, x, y)
        return loss * loss_scale, (loss, out, new)

    # First pass: a gradient per group at w. BatchNorm buffers go in as per-group copies so each
    # group updates its own; they are merged into one update at the end.
    stacked = {n: buffers[n].unsqueeze(0).repeat(groups, *([1] * buffers[n].dim())) for n in norm_names}
    first = vmap(grad_and_value(scaled_group_loss, has_aux=True), in_dims=(None, 0, 0, 0),
                 randomness="different")
    grads, (_, (losses, logits, new_buffers)) = first(dict(zip(names, params)), stacked, xg, yg)
    with torch.no_grad():
        # Statistics: the groups' mean. The batch counter: any group's, as every group advanced
        # it alike (or, for layers that hold their statistics, not at all).
        merged = {n: new_buffers[n].float().mean(0).to(buffers[n].dtype) if buffers[n].is_floating_point()
                  else new_buffers[n][0].clone() for n in norm_names}
    eps = _group_eps([grads[n] for n in names], params, settings, optimizer, loss_scale)

    # Second pass: the summed loss of all groups at their own w + eps_g has, as gradient with
    # respect to the shared w, the sum of the groups' gradients: one ordinary backward.
    live = [named[n] for n in names]
    perturbed = {n: p.unsqueeze(0) + e for n, p, e in zip(names, live, eps)}
    throwaway = {n: buffers[n].unsqueeze(0).repeat(groups, *([1] * buffers[n].dim())) for n in norm_names}
    second = vmap(lambda w, b, x, y: group_loss(w, b, x, y)[0], in_dims=(0, 0, 0, 0), randomness="different")
    (second(perturbed, throwaway, xg, yg).mean() * loss_scale).backward()
    # Only now, with both passes done, may the statistics move: a failure above falls back to
    # the loop, which must start from the statistics before this step or it counts them twice.
    with torch.no_grad():
        for n in norm_names:
            buffers[n].copy_(merged[n])
    return losses.mean().detach(), logits.reshape(-1, *logits.shape[2:]).detach()


def _is_norm_stat(module: nn.Module, buffer_name: str) -> bool:
    owner_name, _, leaf = buffer_name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return isinstance(owner, nn.modules.batchnorm._NormBase) and leaf in (
        "running_mean", "running_var", "num_batches_tracked")


def _grouped_loop(module, loss_fn, xg, yg, optimizer: SAM, loss_scale) -> tuple[Tensor, Tensor]:
    """The same computation one group at a time, for models vmap cannot batch. Each group's
    two passes run back to back, so only one eps is alive at a time (memory O(1) in groups)."""
    named, settings = _sam_params(optimizer, module)
    live = list(named.values())
    groups = xg.shape[0]
    norm_stats = _norm_buffers(module)
    with torch.no_grad():
        start = [b.clone() for b in norm_stats]
        stat_sum = [torch.zeros_like(b, dtype=torch.float64) for b in norm_stats]
        saved, _ = optimizer._buffers(live)
        torch._foreach_copy_(saved, live)
    losses, logits = [], []
    for j in range(groups):
        if norm_stats:
            with torch.no_grad():
                torch._foreach_copy_(norm_stats, start)
        out = module(xg[j])
        loss = loss_fn(out, yg[j])
        # Scaled like the second pass so fp16 gradients don't underflow (eps is normalised).
        grads = torch.autograd.grad(loss * loss_scale, live, allow_unused=True)
        losses.append(loss.detach())
        logits.append(out.detach())
        with torch.no_grad():
            if norm_stats:
                torch._foreach_add_(stat_sum, norm_stats)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, live)]
            eps = _group_eps([g.unsqueeze(0) for g in grads], saved, settings, optimizer, loss_scale)
            torch._foreach_add_(live, [e.squeeze(0) for e in eps])
        with _frozen_norm_stats(module):
            # Divided in the loss's precision, then scaled (the scale is a float32 tensor).
            (loss_fn(module(xg[j]), yg[j]) / groups * loss_scale).backward()
        with torch.no_grad():
            torch._foreach_copy_(live, saved)
    with torch.no_grad():
        # One update of the running statistics with the groups' mean statistics; the batch
        # counter keeps the last group's value, which each group advanced alike from the start.
        for b, acc in zip(norm_stats, stat_sum):
            if b.is_floating_point():
                b.copy_((acc / groups).to(b.dtype))
    return torch.stack(losses).mean(), torch.cat(logits)


def _all_reduce_grads(optimizer: SAM, group) -> None:
    """Average the gradients across a process group in one flattened all-reduce."""
    _all_reduce_mean([p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None],
                     group)


#: All-reduce rounds this process's SAM steps made themselves (beside DDP's own), for the
#: trainer's `allreduce_per_step`: a count, so a change of communication pattern shows up in
#: every multi-worker trial's metrics.
own_all_reduces = 0


def _all_reduce_mean(tensors: list[Tensor], group) -> list[Tensor]:
    """Average `tensors` in place across a process group in one flattened all-reduce."""
    global own_all_reduces
    if not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    own_all_reduces += 1
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    torch._foreach_copy_(tensors, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)])
    return tensors

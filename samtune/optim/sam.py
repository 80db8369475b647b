"""The SAM optimizer: Sharpness-Aware Minimization around any `torch.optim` base optimizer.

Foret et al. 2020, "Sharpness-Aware Minimization for Efficiently Improving Generalization"
(arXiv 2010.01412) and, for `adaptive=True`, Kwon et al. 2021, "ASAM" (arXiv 2102.11600).
With g the gradient of the loss at the weights w, one step computes

    eps = rho * g / ||g||_2                               (SAM)
    eps = rho * T^2 g / ||T g||_2,   T = |w| + eta        (ASAM, per coordinate)

moves to w + eps (`first_step`), takes the gradient there, returns to w exactly and lets the
base optimizer step from w with that gradient (`second_step`). `step(closure)` does both passes.
With `rho == 0` in every group there is no second pass: a step is the base optimizer's, bit for
bit.

The training step around this optimizer (m-sharpness, DistributedDataParallel, fp16 scaling,
BatchNorm statistics) is `samtune.optim.step.sam_step`; the rules that skip the second pass on
some steps are in `samtune.optim.variants`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from samtune.optim.ascent import (
    NORM_FLOOR,
    ascent_direction,
    groups_with_grads,
    move_to_peak,
    squared_norm,
)
from samtune.optim.attached import AttachedVariant
from samtune.optim.closure_step import closure_step
from samtune.optim.variants import SAMVariant

__all__ = ["NORM_FLOOR", "SAM"]


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
        variant: which steps take the second pass: a `samtune.optim.variants.SAMVariant`, a variant
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
            here or in `add_param_group`), or a bad variant (see `samtune.optim.variants`).

    On L(w) = ||w||^2 / 2 the gradient is w itself: from w = (3, 4), eps = 0.5 * (3, 4) / 5 =
    (0.3, 0.4), and SGD steps from w with the gradient at w + eps = (3.3, 4.4):

    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> optimizer = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    >>> def closure():
    ...     optimizer.zero_grad()
    ...     loss = (w ** 2).sum() / 2
    ...     loss.backward()
    ...     return loss
    >>> float(optimizer.step(closure))  # the loss at w
    12.5
    >>> w.detach()
    tensor([2.6700, 3.5600])
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        perturb_weight_decay: bool = False,
        variant: SAMVariant | str | Mapping[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_group_settings({"rho": rho, "adaptive": adaptive, "eta": eta}, where="")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD, got {base_optimizer!r}"
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
        self._attached = AttachedVariant()
        if variant is not None:
            self.use_variant(variant)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group, as for any optimizer; it may set its own `rho`, `adaptive` and `eta`.

        Raises:
            ValueError: the group's `rho < 0`, or `eta <= 0` with `adaptive=True`.
        """
        if not isinstance(param_group, dict):
            raise ValueError(f"a parameter group must be a dict with 'params', got {type(param_group).__name__}")
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
        groups = groups_with_grads(self.param_groups)
        if not groups:
            return
        directions = [
            ascent_direction(group, params, loss_scale, self.perturb_weight_decay) for group, params in groups
        ]
        perturbed = move_to_peak(groups, directions, self._buffers)
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
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(  # type: ignore[override]  # torch types the closure as returning float; SAM's returns the loss
        self,
        closure: Callable[[], Tensor] | None = None,
    ) -> Tensor | None:
        """The full SAM step, like any PyTorch optimizer.

        `closure` must zero the gradients, compute the loss, call `backward()` and return the
        loss; it is called at `w` and again at `w + eps`. The loss at `w` is returned. Without a
        closure only the base step is possible, which is what `rho == 0` means. With a variant,
        the closure is called once on the variant's one-pass steps (every step of ``msam``, at
        the momentum-perturbed weights; the loss returned is the one there). ``sampa`` needs
        `samtune.optim.step.sam_step`.

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
        return closure_step(self, self._active_variant(), closure)

    # -- variants --------------------------------------------------------------------------

    def use_variant(self, variant: SAMVariant | str | Mapping[str, Any]) -> SAMVariant:
        """Follow `variant` from now on (a `SAMVariant`, a name, or a trial config) and return it.

        The first call attaches it (and resumes it from a loaded checkpoint, if any); later calls
        with the same rule (same name and knobs) keep the attached one and its state, so a
        training loop may pass the same config every step.

        Raises:
            ValueError: a different rule than the attached one, a checkpoint of another rule,
                or bad knobs.
        """
        return self._attached.attach(variant)

    @property
    def variant(self) -> SAMVariant | None:
        """The variant attached (`use_variant`), or None."""
        return self._attached.variant

    def _active_variant(self) -> SAMVariant | None:
        return self._attached.active()

    def gradients(self, clone: bool = False) -> list[Tensor | None]:
        """Every parameter's `.grad` (None where there is none), in `param_groups` order."""
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        return [None if g is None else g.clone() for g in grads] if clone else grads

    @torch.no_grad()
    def squared_grad_norm(self) -> Tensor:
        """||g||^2 over every parameter's `.grad` together (float64, on the first grad's device)."""
        return squared_norm([g for g in self.gradients() if g is not None])

    def base_optimizer_step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One plain step of the base optimizer (the `rho == 0` path): bit-identical to it."""
        loss = self.base_optimizer.step(closure)  # type: ignore[arg-type]  # torch types the closure as returning float
        self._opt_called = True
        return loss

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = self.base_optimizer.state_dict()
        variant_state = self._attached.state_dict()
        if variant_state is not None:
            state["sam_variant"] = variant_state
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        variant_state = state_dict.pop("sam_variant", None)
        self.base_optimizer.load_state_dict(state_dict)
        if variant_state is not None:
            self._attached.load_state_dict(variant_state)
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

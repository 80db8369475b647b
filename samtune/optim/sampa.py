"""SAMPa's step: SAM's two gradients made independent, so that two workers compute one each.

SAMPa (Xie, Pethick and Cevher, NeurIPS 2024, "SAMPa: Sharpness-aware Minimization
Parallelized"; reference code LIONS-EPFL/SAMPa). Implemented: SAMPa-lambda, lambda =
``sampa_lambda`` (0.2, the reference code's default; 0 gives SAMPa-0). With x_t the weights
before step t, B_t its batch, g^y_t = grad L(y_t; B_{t-1}) kept from the previous step and rho,
eta_t the groups' radius and current learning rate, step t computes

    x~_t    = x_t + rho * g^y_t / ||g^y_t||_2          (one norm over every parameter)
    y_{t+1} = x_t - eta_t * d_t
    G_t     = (1 - lambda) * grad L(x~_t; B_{t-1}) + lambda * grad L(y_{t+1}; B_t)
    x_{t+1} = the base optimizer's step from x_t with G_t

and keeps g^y_{t+1} = grad L(y_{t+1}; B_t) for the next step. The two gradients of G_t depend
only on x_t and on what the previous step kept, so they can run at the same time. As in the
reference code, the perturbed gradient is taken on the previous batch, the one g^y_t was
computed on. d_t is the base optimizer's step direction with g^y_t in place of the gradient:
for SGD (the reference's case) d_t = mu * buf_t + (g^y_t + wd * x_t) with buf_t its momentum
buffer (torch's SGD rule, dampening and nesterov included; d_t = g^y_t + wd * x_t while there is
no buffer); for any other base optimizer the paper's y_{t+1} = x_t - eta_t * g^y_t. The first
step has no g^y: x~_0 = y_1 = x_0, both gradients are taken on B_0, and the step is the base
optimizer's plain step.

Where the passes run. In one process (a plain model) the two gradients are computed one after
the other: the same update, no speed-up. Under DistributedDataParallel with an even number of
workers, ranks 2j and 2j + 1 form pair j and see the same local batch (the trainer shards the
data by pair): the even rank computes grad L(x~_t; B_{t-1}), the odd rank grad L(y_{t+1}; B_t),
and one all-reduce over a flat buffer holding both halves (plus the odd ranks' BatchNorm running
statistics, loss and logits) gives every rank both gradients averaged over the pairs; every rank
then takes the same step. The passes run on the module inside the DDP wrapper, so DDP adds no
collective of its own.

BatchNorm running statistics advance once per step, in the pass at y_{t+1} on B_t (averaged over
the pairs); the pass at x~_t runs with them frozen. The loss and logits returned are the pass's
at y_{t+1} on B_t, the current batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from samtune.optim import msharpness
from samtune.optim.msharpness import LossFn, frozen_norm_stats, is_ddp, norm_buffers
from samtune.optim.sam import SAM
from samtune.optim.variants import SAMPa

# Keeps the ascent finite when the auxiliary gradient is exactly zero.
_NORM_FLOOR = 1e-12


def sampa_gradients(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    optimizer: SAM,
    variant: SAMPa,
) -> tuple[Tensor, Tensor]:
    """Leave G_t (module docstring) in every parameter's `.grad` of a `samtune.optim.sam.SAM`
    optimizer, with the weights at x_t; update `variant`'s kept gradient and batch. Returns the
    detached (loss, logits) of the pass at y_{t+1} on this batch.

    Raises ValueError for a DDP model on an odd number of workers.

    >>> from samtune.optim.sam import SAM
    >>> model = nn.Linear(3, 2)
    >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    >>> rule = SAMPa(lam=0.2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    >>> loss, logits = sampa_gradients(model, nn.functional.cross_entropy, x, y, opt, rule)
    >>> logits.shape, rule.aux_grad is not None, model.weight.grad.shape
    (torch.Size([4, 2]), True, torch.Size([2, 3]))
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    role, pairs = _role(model)
    module = model.module if is_ddp(model) else model
    kept = variant.aux_grad
    previous = variant.previous if kept is not None and variant.previous is not None else (inputs, targets)
    if role != 1:
        with frozen_norm_stats(module):
            perturbed, perturbed_loss, logits = _gradient_at(
                module, loss_fn, *previous, params, optimizer, _ascent(optimizer, kept)
            )
    if role == 0:
        # The even rank learns the logits' shape from its own pass (the odd rank sends them).
        logits = logits.new_zeros((targets.shape[0], *logits.shape[1:]))
        perturbed, aux, loss, logits = _exchange(module, params, perturbed, perturbed_loss, logits, role, pairs)
    else:
        aux, loss, logits = _gradient_at(
            module, loss_fn, inputs, targets, params, optimizer, _extrapolation(optimizer, kept)
        )
        if role == 1:
            perturbed, aux, loss, logits = _exchange(module, params, aux, loss, logits, role, pairs)
    lam = variant.lam
    for p, a, b in zip(params, perturbed, aux):
        p.grad = a.mul(1.0 - lam).add_(b, alpha=lam)
    variant.aux_grad = aux
    variant.previous = (inputs.detach(), targets.detach())
    return loss, logits


def _role(model: nn.Module) -> tuple[int | None, int]:
    """This rank's pass (0: perturbed, 1: auxiliary; None: both, one process) and the pair count."""
    if not is_ddp(model):
        return None, 1
    world = dist.get_world_size()
    if world % 2:
        raise ValueError(
            f"sam_variant='sampa' pairs the workers (one computes the perturbed "
            f"gradient, the other the auxiliary one): it needs an even number of "
            f"workers, got {world}"
        )
    return dist.get_rank() % 2, world // 2


def _gradient_at(
    module: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params: list[Tensor],
    optimizer: SAM,
    shift: list[Tensor | None] | None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The gradient (zero where none) at the weights moved by `shift`, which are put back exactly
    afterwards; with the detached loss and logits."""
    saved = None
    if shift is not None:
        moved = [p for p, s in zip(params, shift) if s is not None]
        saved, _ = optimizer._buffers(moved)
        with torch.no_grad():
            torch._foreach_copy_(saved, moved)
            torch._foreach_add_(moved, [s for s in shift if s is not None])
    optimizer.zero_grad(set_to_none=True)
    logits = module(inputs)
    loss = loss_fn(logits, targets)
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    optimizer.zero_grad(set_to_none=True)
    if saved is not None:
        with torch.no_grad():
            torch._foreach_copy_(moved, saved)
    return grads, loss.detach(), logits.detach()


@torch.no_grad()
def _ascent(optimizer: SAM, kept: list[Tensor] | None) -> list[Tensor | None] | None:
    """rho * g^y / ||g^y|| per parameter (None: no kept gradient yet, no move)."""
    if kept is None:
        return None
    norms = torch._foreach_norm(kept)
    device = norms[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    shift: list[Tensor | None] = []
    i = 0
    for group in optimizer.param_groups:
        scale = group["rho"] / (norm + _NORM_FLOOR)
        for _ in group["params"]:
            shift.append(kept[i] * scale.to(kept[i].device, kept[i].dtype))
            i += 1
    return shift


@torch.no_grad()
def _extrapolation(optimizer: SAM, kept: list[Tensor] | None) -> list[Tensor | None] | None:
    """y_{t+1} - x_t = -eta_t * d_t per parameter (None: no kept gradient yet, no move)."""
    if kept is None:
        return None
    base = optimizer.base_optimizer
    sgd = base if isinstance(base, torch.optim.SGD) else None
    shift: list[Tensor | None] = []
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = kept[i]
            i += 1
            direction = _sgd_direction(sgd, group, p, g) if sgd is not None else g
            shift.append(direction * -group["lr"])
    return shift


def _sgd_direction(base: torch.optim.SGD, group: dict, p: Tensor, g: Tensor) -> Tensor:
    """The step direction torch's SGD would take from p with gradient g, its state untouched."""
    d_p = g + group["weight_decay"] * p if group["weight_decay"] else g
    mu = group["momentum"]
    if not mu:
        return d_p
    buf = base.state.get(p, {}).get("momentum_buffer")
    new = d_p if buf is None else buf * mu + d_p * (1.0 - group["dampening"])
    return d_p + new * mu if group["nesterov"] else new


def _exchange(
    module: nn.Module, params: list[Tensor], half: list[Tensor], loss: Tensor, logits: Tensor, role: int, pairs: int
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """One all-reduce: each rank adds its half (and the odd ranks their BatchNorm statistics,
    `loss` and `logits`) into a zero buffer; the sum over the pairs' ranks, divided by the pair
    count, is every half's mean."""
    dtype, device = params[0].dtype, params[0].device
    buffers = norm_buffers(module)
    stats = [b for b in buffers if b.is_floating_point()]
    counts = [b for b in buffers if not b.is_floating_point()]
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    layout = [total, total, sum(b.numel() for b in stats), 1, logits.numel()]
    flat = torch.zeros(sum(layout), dtype=dtype, device=device)
    parts = flat.split(layout)
    if role == 0:
        torch.cat([g.reshape(-1) for g in half], out=parts[0])
    else:
        torch.cat([g.reshape(-1) for g in half], out=parts[1])
        if stats:
            torch.cat([b.reshape(-1).to(dtype) for b in stats], out=parts[2])
        parts[3].copy_(loss.reshape(1))
        parts[4].copy_(logits.reshape(-1))
    msharpness.own_all_reduces += 1
    dist.all_reduce(flat)
    flat /= pairs
    with torch.no_grad():
        if stats:
            torch._foreach_copy_(
                stats, [s.view_as(b) for s, b in zip(parts[2].split([b.numel() for b in stats]), stats)]
            )
        if role == 0:  # the odd rank's pass counted this step's batch
            for b in counts:
                b.add_(1)
    perturbed = [g.view_as(p) for g, p in zip(parts[0].split(sizes), params)]
    aux = [g.view_as(p).clone() for g, p in zip(parts[1].split(sizes), params)]
    return perturbed, aux, parts[3].reshape(()).clone(), parts[4].view_as(logits).to(logits.dtype)

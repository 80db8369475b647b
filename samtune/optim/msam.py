"""Momentum-SAM's step: one forward/backward pass, at the weights moved against the momentum.

MSAM (Becker, Altrock and Risse, 2023, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", arXiv 2401.12033) replaces SAM's ascent gradient with the base
optimizer's momentum buffer v, which costs nothing to compute. With w_t the weights before step
t, B_t its batch and v_t the buffer as the previous step left it, step t computes

    eps_t   = -rho * v_t / ||v_t||_2          (one norm over every parameter; per group rho)
    g_t     = grad L(w_t + eps_t; B_t)        (the step's only forward/backward pass)
    w_{t+1} = the base optimizer's step from w_t with g_t   (it also updates v to v_{t+1})

v is SGD's ``momentum_buffer`` (v_t = mu v_{t-1} + g_{t-1} + wd w_{t-1}) or AdamW's ``exp_avg``
(m_t = beta1 m_{t-1} + (1 - beta1) g_{t-1}). Before the first step there is no buffer: eps_0 = 0
and the first step is the base optimizer's plain step (so is any step whose buffer is all zero).
The sign follows the reference code (MarlonBecker/MSAM): the weights move along -v, the
direction the next update takes.

Between steps the weights sit at w_t: eps is added at the start of the step and w_t restored
exactly (copied back, not subtracted) before the base optimizer steps, so evaluation,
checkpoints and sharpness measures see w_t. The reference keeps the weights at w_t + eps_t
between steps and moves them back before evaluating; the sequence of w_t and of gradients is
the same, except that its SGD adds weight decay at w_t + eps_t where this step adds it at w_t
(as SAM does). Under DistributedDataParallel the buffer is the same on every worker, so is eps,
and the single pass all-reduces as a plain step does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from samtune.optim.sam import SAM

# Keeps the division finite for an all-zero buffer (then eps is 0).
_NORM_FLOOR = 1e-12

# Where each base optimizer keeps its momentum.
_BUFFER_KEYS = ("momentum_buffer", "exp_avg")


def momentum_buffers(base: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor | None]:
    """The base optimizer's momentum per parameter (SGD's ``momentum_buffer``, AdamW's
    ``exp_avg``); None where it has none yet.

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    >>> momentum_buffers(sgd, [w])
    [None]
    >>> (w * torch.tensor([1.0, 2.0])).sum().backward(); sgd.step()
    >>> momentum_buffers(sgd, [w])
    [tensor([1., 2.])]
    """
    out = []
    for p in params:
        state = base.state.get(p, {})
        buffer = next((state[k] for k in _BUFFER_KEYS if state.get(k) is not None), None)
        out.append(buffer)
    return out


@torch.no_grad()
def momentum_first_step(optimizer: SAM) -> None:
    """Move a `samtune.optim.sam.SAM` optimizer's parameters from w to w + eps, eps = -rho * v /
    ||v|| (see the module docstring), saving w so that the optimizer's `second_step` (or its
    `_restore_weights`) puts it back exactly. Parameters without a buffer stay where they are.

    Raises ValueError for a group with ``adaptive=True``: ASAM's scaling is defined for the
    gradient ascent step, not for the momentum direction.

    >>> from samtune.optim.sam import SAM
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    >>> opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    >>> opt.base_optimizer.state[w]["momentum_buffer"] = torch.tensor([3.0, 4.0])
    >>> momentum_first_step(opt); w.detach()
    tensor([0.7000, 0.6000])
    >>> opt._restore_weights(); w.detach()
    tensor([1., 1.])
    """
    groups = []
    for group in optimizer.param_groups:
        if group["adaptive"]:
            raise ValueError(
                "sam_variant='msam' moves along the momentum buffer; ASAM's adaptive "
                "scaling is not defined for it: use optimizer 'sam'"
            )
        pairs = [
            (p, v)
            for p, v in zip(group["params"], momentum_buffers(optimizer.base_optimizer, group["params"]))
            if v is not None
        ]
        if pairs:
            groups.append((group, [p for p, _ in pairs], [v for _, v in pairs]))
    optimizer._perturbed = []
    if not groups:
        return
    norms = [n for _, _, buffers in groups for n in torch._foreach_norm(buffers)]
    device = norms[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    for group, params, buffers in groups:
        saved, eps = optimizer._buffers(params)
        torch._foreach_copy_(saved, params)
        scale = -group["rho"] / (norm + _NORM_FLOOR)
        torch._foreach_copy_(eps, buffers)
        torch._foreach_mul_(eps, [scale.to(p.device, p.dtype) for p in params])
        torch._foreach_add_(params, eps)
        optimizer._perturbed.append((params, saved))

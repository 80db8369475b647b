"""How SAM's two passes run inside `samtune.optim.step.sam_step`: on the whole local batch, or
with one perturbation per group of m examples (m-sharpness), and across workers.

m-sharpness (Foret et al. 2020, section 4.1): the batch is cut into disjoint groups of `m`
examples, each group gets its own `eps` from its own gradient, and the base step uses the mean of
the groups' gradients at their own perturbed weights. The groups run in one batched pass
(`torch.func.vmap`) or one after another, the same computation.

Under `DistributedDataParallel` the whole-batch first pass runs inside `no_sync()`, so every
worker perturbs with its own gradient (m = per-worker batch) at no extra communication; only the
second pass all-reduces. A `perturbation_group`'s first gradient and the grouped path's gradients
are all-reduced here, by hand; `own_all_reduces` counts those rounds.

BatchNorm running statistics advance once per step: the second pass runs with them frozen, and
the groups' statistics are merged into one update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from samtune.optim.sam import NORM_FLOOR, SAM

LossFn = Callable[[Tensor, Tensor], Tensor]


def backward(loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _loss_scale(scaler: torch.amp.GradScaler | None, device: torch.device) -> Tensor | float:
    """The factor a scaled loss carries: a 0-dim tensor on the device (no host sync), or 1.0."""
    if scaler is None:
        return 1.0
    # Scaling a one also sets up a scaler that has not scaled anything yet (the grouped path's
    # first step), which its unscale_() requires.
    return scaler.scale(torch.ones((), device=device))


def is_ddp(model: nn.Module) -> TypeGuard[nn.parallel.DistributedDataParallel]:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def whole_batch_sam(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    optimizer: SAM,
    scaler: torch.amp.GradScaler | None,
    sync_perturbation: bool,
    perturbation_group: dist.ProcessGroup | None,
    between: Callable[[], bool] | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """Both passes on the whole local batch; `between` (a variant's hook) runs after the first
    pass and may stop there. Returns (loss, logits, whether the second pass ran)."""
    ddp = is_ddp(model)
    # The forward must sit inside no_sync() too: DDP decides at forward time whether the
    # backward all-reduces.
    local = model.no_sync() if is_ddp(model) and not sync_perturbation else contextlib.nullcontext()
    with local:
        logits = model(inputs)
        loss = loss_fn(logits, targets)
        backward(loss, scaler)
    if ddp and perturbation_group is not None and not sync_perturbation:
        _all_reduce_grads(optimizer, perturbation_group)
    if between is not None and not between():
        return loss.detach(), logits.detach(), False
    optimizer.first_step(zero_grad=True, loss_scale=_loss_scale(scaler, inputs.device))
    with frozen_norm_stats(model):
        backward(loss_fn(model(inputs), targets), scaler)
    return loss.detach(), logits.detach(), True


# -- BatchNorm statistics ----------------------------------------------------------------------


def norm_buffers(module: nn.Module) -> list[Tensor]:
    return [
        b
        for mod in module.modules()
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats
        for b in (mod.running_mean, mod.running_var, mod.num_batches_tracked)
        if b is not None
    ]


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Run a pass without advancing BatchNorm running statistics (restored exactly after)."""
    buffers = norm_buffers(model)
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


def vmap_by_default(device: torch.device) -> bool:
    # On CPU the batched per-group weights cost more memory traffic than they save in kernel
    # launches (m=16 of 128: 1.3x slower on ResNet-20, 2x on an MLP).
    return device.type != "cpu"


def grouped_sam(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    optimizer: SAM,
    m: int,
    vectorize: bool | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[Tensor, Tensor]:
    """Each group of m gets its own eps; the base step uses the mean of the groups' gradients
    at their own perturbed weights. Runs on the unwrapped module and all-reduces by hand under
    DDP (one flattened round), since DDP's hooks only see its own forward."""
    module = model.module if is_ddp(model) else model
    groups = inputs.shape[0] // m
    xg = inputs.reshape(groups, m, *inputs.shape[1:])
    yg = targets.reshape(groups, m, *targets.shape[1:])
    loss_scale = _loss_scale(scaler, inputs.device)
    if vectorize is None and not vmap_by_default(inputs.device):
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
    if is_ddp(model):
        _all_reduce_grads(optimizer, None)
    return result


def _sam_params(optimizer: SAM, module: nn.Module) -> tuple[dict[str, Tensor], list[dict]]:
    """The module's trainable parameters by name, and the SAM group settings for each."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named: dict[str, Tensor] = {n: p for n, p in module.named_parameters() if p.requires_grad and id(p) in group_of}
    return named, [group_of[id(p)] for p in named.values()]


def group_eps(
    grads: list[Tensor], params: list[Tensor], settings: list[dict], optimizer: SAM, loss_scale: float | Tensor = 1.0
) -> list[Tensor]:
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
        e = d * (s["rho"] / (norm + NORM_FLOOR)).reshape(shape)
        if t is not None:
            e = e * t
        eps.append(torch.where(finite.reshape(shape), e, 0.0))
    return eps


def _grouped_vmap(
    module: nn.Module, loss_fn: LossFn, xg: Tensor, yg: Tensor, optimizer: SAM, loss_scale: float | Tensor
) -> tuple[Tensor, Tensor]:
    named, settings = _sam_params(optimizer, module)
    names = list(named)
    params = [named[n].detach() for n in names]
    frozen = {n: p.detach() for n, p in module.named_parameters() if n not in named}
    buffers = dict(module.named_buffers())
    groups = xg.shape[0]
    norm_names = [n for n, b in buffers.items() if _is_norm_stat(module, n)]

    def group_loss(
        trainable: dict[str, Tensor], group_buffers: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        out = functional_call(module, ({**trainable, **frozen}, {**buffers, **group_buffers}), (x,))
        return loss_fn(out, y), (out, group_buffers)

    def scaled_group_loss(
        trainable: dict[str, Tensor], group_buffers: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, dict[str, Tensor]]]:
        # The gradient of the scaled loss, as the second pass's, so fp16 gradients don't
        # underflow; eps is normalised, so the scale cancels in it.
        loss, (out, new) = group_loss(trainable, group_buffers, x, y)
        return loss * loss_scale, (loss, out, new)

    # First pass: a gradient per group at w. BatchNorm buffers go in as per-group copies so each
    # group updates its own; they are merged into one update at the end.
    stacked = {n: buffers[n].unsqueeze(0).repeat(groups, *([1] * buffers[n].dim())) for n in norm_names}
    first = vmap(grad_and_value(scaled_group_loss, has_aux=True), in_dims=(None, 0, 0, 0), randomness="different")
    grads, (_, (losses, logits, new_buffers)) = first(dict(zip(names, params)), stacked, xg, yg)
    with torch.no_grad():
        # Statistics: the groups' mean. The batch counter: any group's, as every group advanced
        # it alike (or, for layers that hold their statistics, not at all).
        merged = {
            n: new_buffers[n].float().mean(0).to(buffers[n].dtype)
            if buffers[n].is_floating_point()
            else new_buffers[n][0].clone()
            for n in norm_names
        }
    eps = group_eps([grads[n] for n in names], params, settings, optimizer, loss_scale)

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
        "running_mean",
        "running_var",
        "num_batches_tracked",
    )


def _grouped_loop(
    module: nn.Module, loss_fn: LossFn, xg: Tensor, yg: Tensor, optimizer: SAM, loss_scale: float | Tensor
) -> tuple[Tensor, Tensor]:
    """The same computation one group at a time, for models vmap cannot batch. Each group's
    two passes run back to back, so only one eps is alive at a time (memory O(1) in groups)."""
    named, settings = _sam_params(optimizer, module)
    live = list(named.values())
    groups = xg.shape[0]
    norm_stats = norm_buffers(module)
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
        partial = torch.autograd.grad(loss * loss_scale, live, allow_unused=True)
        losses.append(loss.detach())
        logits.append(out.detach())
        with torch.no_grad():
            if norm_stats:
                torch._foreach_add_(stat_sum, norm_stats)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(partial, live)]
            eps = group_eps([g.unsqueeze(0) for g in grads], saved, settings, optimizer, loss_scale)
            torch._foreach_add_(live, [e.squeeze(0) for e in eps])
        with frozen_norm_stats(module):
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


def _all_reduce_grads(optimizer: SAM, group: dist.ProcessGroup | None) -> None:
    """Average the gradients across a process group in one flattened all-reduce."""
    all_reduce_mean([p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None], group)


#: All-reduce rounds this process's SAM steps made themselves (beside DDP's own), for the
#: trainer's `allreduce_per_step`: a count, so a change of communication pattern shows up in
#: every multi-worker trial's metrics.
own_all_reduces = 0


def all_reduce_mean(tensors: list[Tensor], group: dist.ProcessGroup | None) -> list[Tensor]:
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

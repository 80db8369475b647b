"""The classification head and BatchNorm statistics of a model, for finetuning.

`find_head` locates the classifier (``model.head`` in samtune's models, else the last
``nn.Linear``, so torchvision models work too), `replace_head` swaps in a fresh one for a new
class count, `param_groups` gives the head and the backbone their own learning rates, and
`freeze_batchnorm_stats` keeps BatchNorm running statistics at their pretrained values.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier layer: ``model.head`` for samtune models, else the last ``nn.Linear``.

    Returns ``(dotted name, module)``. Raises ValueError when the model has no linear layer.
    """
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return "head", head
    last: tuple[str, nn.Linear] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as its classification head")
    return last


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Put a freshly initialised ``nn.Linear(in_features, num_classes)`` in place of the head.

    Returns the same model (modified in place). Raises ValueError as ``find_head`` does.
    """
    name, old = find_head(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent = model
    *path, leaf = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, new)
    return model


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the head's parameters."""
    name, head = find_head(model)
    return {f"{name}.{p}" for p, _ in head.named_parameters()}


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: the head at ``lr``, everything else at ``lr * backbone_lr_scale``.

    For finetuning with a slower backbone; a scale of 1.0 gives one group. Parameters with
    ``requires_grad=False`` are left out; a scale of 0 leaves the backbone out entirely (a linear
    probe). Raises ValueError for a negative scale and as ``find_head`` does.
    """
    if backbone_lr_scale < 0:
        raise ValueError(f"backbone_lr_scale must be >= 0, got {backbone_lr_scale}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if backbone_lr_scale == 1.0:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    head = head_parameter_names(model)
    groups = [{"params": [p for n, p in trainable if n in head], "lr": lr}]
    if backbone_lr_scale > 0:
        groups.append({"params": [p for n, p in trainable if n not in head], "lr": lr * backbone_lr_scale})
    return groups


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never updates them.

    The affine weight and bias still train. State-dict keys are those of ``nn.BatchNorm2d``.
    """

    frozen_stats = True  # read by the sharpness measures, which keep these statistics

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, momentum=0.0, eps=self.eps
        )


class FrozenStatsBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d counterpart of `FrozenStatsBatchNorm2d` (the MLP's normalisation)."""

    frozen_stats = True

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, momentum=0.0, eps=self.eps
        )


def freeze_batchnorm_stats(model: nn.Module) -> nn.Module:
    """Freeze the running statistics of every BatchNorm1d/2d in ``model`` (in place; returns it).

    Finetuning with frozen statistics follows the SAM paper's finetuning runs; it holds whatever
    ``model.train()`` is called later, because the layers' class changes, not their mode.
    """
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FrozenStatsBatchNorm2d
        elif type(m) is nn.BatchNorm1d:
            m.__class__ = FrozenStatsBatchNorm1d
    return model

"""Model registry: the networks SAM is studied on, built by name for a given input shape.

Names (``build_model(name, num_classes, input_shape, norm)``):

- ``mlp``: two hidden layers of 512 units; a baseline with no spatial structure.
- ``cnn``: a small VGG-style net (three conv stages of 32/64/128 channels, global average pool).
  Fast on CPU for the 8x8 digits and for CIFAR subsets; big enough to memorise noisy labels.
- ``resnet20`` / ``resnet32`` / ``resnet56``: the CIFAR ResNets of He et al. (2016), 3 stages of
  16/32/64 channels with parameter-free (zero-padding, "option A") shortcuts; the SAM paper's
  label-noise table (Foret et al., 2020) uses this family.
- ``resnet18``: the CIFAR variant of ResNet-18 (3x3 stem, no max-pool, 64..512 channels).
- ``wrn16_8`` / ``wrn28_10``: Wide ResNets (Zagoruyko & Komodakis, 2016), pre-activation blocks,
  no dropout; WRN-28-10 is the SAM paper's CIFAR model.
- ``torchvision:<name>``: any ``torchvision.models`` classifier (e.g. ``torchvision:resnet18``),
  with a fresh ``num_classes`` head; pretrained weights come from the finetuning scenario.

``norm`` is ``"batch"`` (BatchNorm), ``"group"`` (GroupNorm: no statistic is shared between
examples, so per-group m-sharpness perturbations stay independent) or ``"none"``.

Every samtune model keeps its classifier in ``model.head`` (an ``nn.Linear``); ``replace_head``
and ``head_parameter_names`` find it for torchvision models too.
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
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


class FrozenStatsBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d counterpart of `FrozenStatsBatchNorm2d` (the MLP's normalisation)."""

    frozen_stats = True

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


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

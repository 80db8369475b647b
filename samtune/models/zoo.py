"""Model registry: the networks SAM is studied on, built by name for a given input shape.

Names (``build_model(name, num_classes, input_shape, norm)``):

- ``mlp``: two hidden layers of 512 units; a baseline with no spatial structure.
- ``cnn``: a small VGG-style net (three conv stages of 32/64/128 channels, global average pool).
  Fast on CPU for the 8x8 digits and for CIFAR subsets; big enough to memorise noisy labels.
- ``cnn_small``: the same at half width (16/32/64 channels; 24k parameters against the 94k of
  ``cnn``): still several times more parameters than the digits' 1,293 training images, at
  about half the cost of a step on a CPU.
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

import difflib
import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from samtune.contract.keys import NORMS
from samtune.models.heads import replace_head


def _group_count(channels: int) -> int:
    # 32 groups is GroupNorm's default (Wu & He, 2018); narrow layers get groups of at least 4
    # channels so each group's statistics are not computed over a handful of values.
    groups = min(32, max(1, channels // 4))
    return math.gcd(groups, channels)


def _norm(norm: str, channels: int, batch_norm: type[nn.Module]) -> nn.Module:
    if norm == "batch":
        return batch_norm(channels)
    if norm == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def norm2d(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for ``[N, C, H, W]`` activations. Raises ValueError for unknown ``norm``."""
    return _norm(norm, channels, nn.BatchNorm2d)


def norm1d(norm: str, features: int) -> nn.Module:
    """Normalisation layer for ``[N, F]`` activations. Raises ValueError for unknown ``norm``."""
    return _norm(norm, features, nn.BatchNorm1d)


class MLP(nn.Module):
    """Flatten -> [Linear -> norm -> ReLU] x len(hidden) -> head."""

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        norm: str = "batch",
        hidden: tuple[int, ...] = (512, 512),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h, bias=norm == "none"), norm1d(norm, h), nn.ReLU(inplace=True)]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv_block(cin: int, cout: int, norm: str) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), norm2d(norm, cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv stages (32, 64, 128 channels by default), 2x2 max-pool after the first two.

    8x8 inputs end at 2x2, 32x32 inputs at 8x8, before a global average pool and the head.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        norm: str = "batch",
        widths: tuple[int, int, int] = (32, 64, 128),
    ) -> None:
        super().__init__()
        c = input_shape[0]
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_conv_block(c, w1, norm),
            nn.MaxPool2d(2),
            *_conv_block(w1, w2, norm),
            nn.MaxPool2d(2),
            *_conv_block(w2, w3, norm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(w3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _ShortcutA(nn.Module):
    """He et al.'s CIFAR "option A" shortcut: stride-2 subsampling plus zero channels, no weights."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Post-activation residual block (conv-norm-relu-conv-norm + shortcut, relu)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
        self.n1 = norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
        self.n2 = norm2d(norm, cout)
        self.shortcut: nn.Module
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(cin, cout, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm2d(norm, cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, stages of BasicBlocks, global average pool, linear head."""

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        norm: str,
        shortcut: str,
    ) -> None:
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(
            nn.Conv2d(c, widths[0], 3, 1, 1, bias=norm == "none"), norm2d(norm, widths[0]), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, width, stride, norm, shortcut))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.layers(self.stem(x))))


class WideBlock(nn.Module):
    """Pre-activation wide block (norm-relu-conv-norm-relu-conv + shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.n1 = norm2d(norm, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n2 = norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.n1(x))
        # The projection shortcut reads the pre-activated input, as in the reference WRN code.
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(F.relu(self.n2(self.conv1(o))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k: (depth-4)/6 blocks per stage, widths 16k/32k/64k."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], depth: int, k: int, norm: str) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * k, 32 * k, 64 * k)
        self.stem = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = 16
        for i, width in enumerate(widths):
            for j in range(n):
                layers.append(WideBlock(cin, width, 2 if (i > 0 and j == 0) else 1, norm))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.final = nn.Sequential(norm2d(norm, cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.final(self.layers(self.stem(x))))


Builder = Callable[[int, tuple[int, int, int], str], nn.Module]


MODELS: dict[str, Builder] = {
    "mlp": lambda k, s, n: MLP(k, s, n),
    "cnn": lambda k, s, n: SmallCNN(k, s, n),
    "cnn_small": lambda k, s, n: SmallCNN(k, s, n, widths=(16, 32, 64)),
    "resnet20": lambda k, s, n: ResNet(k, s, (16, 32, 64), (3, 3, 3), n, "A"),
    "resnet32": lambda k, s, n: ResNet(k, s, (16, 32, 64), (5, 5, 5), n, "A"),
    "resnet56": lambda k, s, n: ResNet(k, s, (16, 32, 64), (9, 9, 9), n, "A"),
    "resnet18": lambda k, s, n: ResNet(k, s, (64, 128, 256, 512), (2, 2, 2, 2), n, "B"),
    "wrn16_8": lambda k, s, n: WideResNet(k, s, 16, 8, n),
    "wrn28_10": lambda k, s, n: WideResNet(k, s, 28, 10, n),
}


def _swap_batchnorm(module: nn.Module, norm: str) -> None:
    """Replace every BatchNorm2d inside a torchvision model by the requested normalisation."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, norm2d(norm, child.num_features))
        else:
            _swap_batchnorm(child, norm)


def build_model(name: str, num_classes: int, input_shape: tuple[int, int, int], norm: str = "batch") -> nn.Module:
    """Build model ``name`` for ``num_classes`` outputs and inputs of shape ``(C, H, W)``.

    ``torchvision:<name>`` builds a torchvision classifier without weights and with a fresh head;
    those need 3-channel inputs. Raises ValueError for an unknown name or norm, a non-positive
    ``num_classes`` or a malformed ``input_shape``.

    >>> import torch
    >>> model = build_model("cnn", num_classes=10, input_shape=(1, 8, 8), norm="group")
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> model.head
    Linear(in_features=128, out_features=10, bias=True)
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
    input_shape = tuple(int(v) for v in input_shape)  # type: ignore[assignment]
    key = name.strip()
    if key.startswith("torchvision:"):
        return _build_torchvision(key.split(":", 1)[1], num_classes, input_shape, norm)
    key = key.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)} or 'torchvision:<name>'")
    return MODELS[key](num_classes, input_shape, norm)


def check_torchvision_arch(arch: str) -> None:
    """Raise ValueError unless ``arch`` names a ``torchvision.models`` classifier: checked when a
    sweep's settings are, so that a misspelt name fails once, before any trial."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        close = difflib.get_close_matches(arch, available, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown torchvision model {arch!r}{hint}; expected one of torchvision.models.list_models()"
            f", e.g. 'resnet18', 'resnet50', 'mobilenet_v3_small'"
        )


def _build_torchvision(arch: str, num_classes: int, input_shape: tuple[int, int, int], norm: str) -> nn.Module:
    import torchvision

    check_torchvision_arch(arch)
    if input_shape[0] != 3:
        raise ValueError(f"torchvision:{arch} expects 3-channel images, got input_shape {input_shape}")
    model = torchvision.models.get_model(arch, weights=None)
    replace_head(model, num_classes)
    if norm != "batch":
        _swap_batchnorm(model, norm)
    return model

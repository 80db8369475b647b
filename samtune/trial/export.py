"""A trial's trained model outside the trial: built from the trial's config as the trainer builds
it (`samtune.trial.state.setup`: the scenario's model, BatchNorm statistics frozen where the config
says so) and given the weights of one of its checkpoints, on the CPU, in eval mode. The sweep logs
its picks' models so (`samtune.sweep.pick_models`).

The model takes what the trainer feeds it: float images ``[N, C, H, W]`` normalised by the
dataset's per-channel ``mean`` and ``std`` (`samtune.data.to_float`), and returns the class
logits; `ModelInputs` says which, for the dataset the trial trained on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from samtune.data.load import load_dataset
from samtune.models.heads import freeze_batchnorm_stats
from samtune.models.zoo import build_model
from samtune.trial.config import resolve_config


@dataclass(frozen=True)
class ModelInputs:
    """What a trial's model takes and returns: its input shape ``(C, H, W)``, the per-channel
    normalisation of its inputs, and its classes (one logit each, in this order)."""

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def model_inputs(dataset: str, data_root: str | None = None) -> ModelInputs:
    """`ModelInputs` of a model trained on ``dataset`` (read once per process and dataset)."""
    data = load_dataset(dataset, data_root)
    return ModelInputs(data.input_shape, tuple(data.mean), tuple(data.std), tuple(data.classes))


def trained_model(config: Mapping[str, Any], weights: Mapping[str, Tensor]) -> tuple[nn.Module, ModelInputs]:
    """The model of a trial of ``config`` with ``weights`` (a checkpoint's ``model`` state dict,
    `samtune.trial.session.read_checkpoint`), in eval mode on the CPU, and what it takes. The
    global torch generator is left as it was.

    Raises what `resolve_config` raises for a config no trial accepts, what `load_dataset` raises
    for data that is not there, and RuntimeError for weights of another model.

    >>> import torch
    >>> net = build_model("mlp", 10, (1, 8, 8))
    >>> model, inputs = trained_model({"dataset": "digits", "model": "mlp"}, net.state_dict())
    >>> inputs.input_shape, len(inputs.classes), model.training
    ((1, 8, 8), 10, False)
    >>> x = torch.randn(3, 1, 8, 8)
    >>> bool(torch.equal(model(x), net.eval()(x)))
    True
    """
    cfg = resolve_config(dict(config))
    inputs = model_inputs(cfg["dataset"], cfg["data_root"])
    # Its random initialisation, overwritten at once, must not move the caller's generator. (On
    # the meta device it would cost nothing, but its first use imports seconds of torch.)
    with torch.random.fork_rng(devices=[]):
        module = build_model(cfg["model"], len(inputs.classes), inputs.input_shape, cfg["norm"])
    if cfg["freeze_bn"]:
        freeze_batchnorm_stats(module)
    module.load_state_dict(dict(weights))
    return module.eval(), inputs

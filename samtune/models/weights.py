"""Pretrained weights for the finetuning scenario: the local file a ``finetune_source`` points
to, and loading it into a model whose head is new.

The SAM paper (Foret et al., 2020, section 3.2) finetunes pretrained networks with SAM; this module
turns a ``finetune_source`` into a state_dict, from local files only (nothing is ever
downloaded from a model hub). Every file is read with ``torch.load(..., weights_only=True)``.
A ``finetune_source`` that is read here is one of:

- **a path** to a ``.pt``/``.pth`` file holding a state_dict, or a checkpoint dict with the state
  under ``"model"``, ``"state_dict"`` or ``"model_state_dict"`` (a ``"module."`` prefix left by
  DistributedDataParallel is dropped). ``samtune train --set dataset=cifar100 --set model=resnet18
  --save-weights w.pt`` writes such a file.
- **``torchvision:<Weights>``**, e.g. ``torchvision:ResNet18_Weights.IMAGENET1K_V1``: the file
  torchvision would download for those weights, looked up in the local torch hub cache
  (``torch.hub.get_dir()/checkpoints``); for ``model="torchvision:<arch>"``.
- **an MLflow URI** (``runs:/<run id>/<path>``, ``models:/<name>/<version>``,
  ``mlflow-artifacts:/...``): fetched from the tracking server with
  ``mlflow.artifacts.download_artifacts``; a folder must hold exactly one ``.pt``/``.pth`` file.

A ``finetune_source`` may also name a dataset (``cifar100``, ``cifar10[0-4]``, ...): that is no
file, and `resolve_source` refuses it; the trial pretrains its model on that dataset first
(`samtune.trial.pretrain`) and hands the weights to the scenario.

`load_backbone` puts such weights into a freshly built model for the target task: every tensor
except the classification head must fit; the head stays freshly initialised for the new classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from samtune.models.heads import head_parameter_names

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:")


_STATE_KEYS = ("model", "state_dict", "model_state_dict")


def _how_to_make(path: str) -> str:
    return (
        f"write one with `samtune train --set dataset=<source> --set model=<model> --save-weights {path}`, "
        f"or set finetune_source to a dataset name (e.g. 'cifar100') to pretrain on it once"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict in ``path`` (a plain state_dict or a checkpoint dict holding one).

    Loads with ``weights_only=True``. Raises FileNotFoundError when the file is missing and
    ValueError when it holds no tensor dict under a known key.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"finetune_source file {path} does not exist; {_how_to_make(str(path))}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors, zip errors: all mean "not weights"
        raise ValueError(
            f"finetune_source {path} is not a PyTorch weights file readable with "
            f"weights_only=True ({type(exc).__name__}: {exc})"
        ) from exc
    state = blob
    if isinstance(blob, dict) and not _is_tensor_dict(blob):
        state = next((blob[k] for k in _STATE_KEYS if isinstance(blob.get(k), dict)), None)
    if not isinstance(state, dict) or not state or not _is_tensor_dict(state):
        keys = list(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(
            f"finetune_source {path} holds no state_dict (found {keys}); expected a dict of "
            f"tensors, or a checkpoint with one under {list(_STATE_KEYS)}"
        )
    # Weights saved from a DistributedDataParallel wrapper carry its attribute name.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())


def load_backbone(model: nn.Module, state: dict[str, Tensor], source: str = "finetune_source") -> nn.Module:
    """Copy ``state`` into ``model`` except its classification head; returns ``model``.

    The head (`samtune.models.find_head`) keeps its fresh initialisation whatever ``state`` holds
    for it, so the class count may differ. Every other parameter and buffer must be in ``state``
    with the same shape. Raises ValueError naming the missing, unexpected or mis-shaped tensors
    (weights of another architecture, norm or input shape).
    """
    head = head_parameter_names(model)
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if k not in head}
    missing = sorted(k for k in own if k not in head and k not in backbone)
    unexpected = sorted(k for k in backbone if k not in own)
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in backbone.items()
        if k in own and v.shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (source vs model)", shapes)):
            if items:
                parts.append(f"{what}: {items[:5]}{' ...' if len(items) > 5 else ''} ({len(items)})")
        raise ValueError(
            f"weights from {source} do not fit {type(model).__name__} apart from its head "
            f"({'; '.join(parts)}); pretrain the same model, norm and input channels"
        )
    model.load_state_dict(backbone, strict=False)
    return model


def resolve_source(source: str) -> Path:
    """The local weights file ``source`` refers to: a file, cached torchvision weights or an
    MLflow artifact. A dataset name is not a file: the trainer pretrains on it first
    (`samtune.trial.pretrain`), so a trial's ``finetune_source`` may also name one.

    Raises FileNotFoundError when a file, cached torchvision weights or an MLflow artifact is
    absent (saying where it looked and how to supply it), ValueError for a source of no known form.
    """
    text = str(source).strip()
    if not text:
        raise ValueError(
            "finetune_source is empty; give a weights file, a dataset name to pretrain on, "
            "'torchvision:<Weights>' or an MLflow URI"
        )
    if text.startswith(MLFLOW_SCHEMES):
        return _from_mlflow(text)
    if text.startswith("torchvision:"):
        return _from_torchvision_cache(text.split(":", 1)[1])
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.suffix in WEIGHT_SUFFIXES or os.sep in text:
        raise FileNotFoundError(f"finetune_source file {path} does not exist; {_how_to_make(text)}")
    raise ValueError(
        f"finetune_source {text!r} is neither an existing file, a dataset to pretrain on "
        "(digits, cifar10, cifar100, imagefolder:<path>, optionally with [classes]), "
        "'torchvision:<Weights>' nor an MLflow URI (runs:/..., models:/...)"
    )


def load_source(source: str) -> dict[str, Tensor]:
    """`read_state_dict` of `resolve_source`: the pretrained state_dict a finetuning trial starts from."""
    return read_state_dict(resolve_source(source))


def _from_torchvision_cache(weights_name: str) -> Path:
    import torchvision

    try:
        weights = torchvision.models.get_weight(weights_name.strip())
    except (ValueError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"unknown torchvision weights {weights_name!r}; expected a name like "
            "'ResNet18_Weights.IMAGENET1K_V1' (see torchvision.models.list_models and "
            "get_model_weights)"
        ) from exc
    filename = weights.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"torchvision weights {weights_name} are not in the local cache at {path}; "
            f"samtune does not download them. Copy {filename} (from {weights.url}) there, "
            f"set TORCH_HOME to where it is, or give finetune_source as its file path"
        )
    return path


def _from_mlflow(uri: str) -> Path:
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 - MlflowException, connection errors: the same advice
        raise FileNotFoundError(
            f"cannot fetch finetune_source {uri} from MLflow (tracking URI {mlflow.get_tracking_uri()}): {exc}"
        ) from exc
    if local.is_file():
        return local
    found = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        raise ValueError(
            f"MLflow artifact {uri} is a folder with {len(found)} weights files "
            f"({[str(p.relative_to(local)) for p in found][:5]}); point the URI at one file"
        )
    return found[0]

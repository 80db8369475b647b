"""Pretrained weights for the finetuning scenario: where ``finetune_source`` points, and loading it.

The SAM paper (Foret et al., 2020, section 3.2) finetunes pretrained networks with SAM; this module
turns a trial's ``finetune_source`` into a state_dict, from local files only (nothing is ever
downloaded from a model hub). Every file is read with ``torch.load(..., weights_only=True)``.

``finetune_source`` is one of:

- **a path** to a ``.pt``/``.pth`` file holding a state_dict, or a checkpoint dict with the state
  under ``"model"``, ``"state_dict"`` or ``"model_state_dict"`` (a ``"module."`` prefix left by
  DistributedDataParallel is dropped). ``samtune train --set dataset=cifar100 --set model=resnet18
  --save-weights w.pt`` or `pretrain` below write such a file.
- **a dataset name** (``cifar100``, ``cifar10[0-4]``, ``digits``, ``imagefolder:<path>``): the
  trial's ``model``/``norm`` is pretrained on it with plain SGD through `samtune.train.fit`, once:
  the weights are cached under ``$SAMTUNE_CACHE_DIR/pretrained`` (else
  ``~/.cache/samtune/pretrained``) by a hash of the pretraining config, and a file lock makes
  parallel trials wait for one pretraining instead of each running it. Optional keys:
  ``pretrain_epochs`` [the trial's ``epochs``], ``pretrain_lr`` [0.05], ``pretrain_batch_size``
  [128; deliberately not the trial's ``batch_size``, which a sweep may search: every trial of a
  cell then shares one pretrained file], ``pretrain_subset`` [None: all source examples],
  ``pretrain_seed`` [0].
  In a multi-worker trial every worker resolves the source itself: each pretrains alone in its
  own process (no collective, `samtune.train.fit(..., alone=True)`) on its own device, and the
  file lock makes the workers of one node wait for the first one's file instead of training
  again. Workers on nodes that do not share the cache folder each pretrain once per node (point
  ``SAMTUNE_CACHE_DIR`` at shared storage to avoid that); DistributedDataParallel starts every
  worker from rank 0's weights either way.
- **``torchvision:<Weights>``**, e.g. ``torchvision:ResNet18_Weights.IMAGENET1K_V1``: the file
  torchvision would download for those weights, looked up in the local torch hub cache
  (``torch.hub.get_dir()/checkpoints``); for ``model="torchvision:<arch>"``.
- **an MLflow URI** (``runs:/<run id>/<path>``, ``models:/<name>/<version>``,
  ``mlflow-artifacts:/...``): fetched from the tracking server with
  ``mlflow.artifacts.download_artifacts``; a folder must hold exactly one ``.pt``/``.pth`` file.

`load_backbone` puts such weights into a freshly built model for the target task: every tensor
except the classification head must fit; the head stays freshly initialised for the new classes.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from samtune.data.dataset import DATASETS
from samtune.data.load import parse_dataset_name
from samtune.models.weights import read_state_dict
from samtune.trial.config import resolve_config
from samtune.trial.loop import run
from samtune.trial.session import _LocalSession

PRETRAIN_FORMAT = "samtune-pretrain-v1"  # part of the cache key: bump when pretraining changes


# --- resolving a source to a local file -------------------------------------------------------

def _is_dataset_name(source: str) -> bool:
    try:
        base, _ = parse_dataset_name(source)
    except ValueError:
        return False
    return base.lower() in DATASETS or base.lower().startswith("imagefolder:")


# --- pretraining on a source dataset ---------------------------------------------------------

def pretrain_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The trial config that pretrains ``config``'s model on dataset ``source``.

    Plain SGD (momentum 0.9, weight decay 5e-4, cosine schedule), clean labels, no validation
    split, no sharpness measurement; ``pretrain_epochs``/``pretrain_lr``/``pretrain_batch_size``/
    ``pretrain_subset``/``pretrain_seed`` override epochs (default: the trial's), lr (0.05),
    batch size (128, whatever the trial's ``batch_size``), examples (all), seed (0).
    """
    def get(key: str, default: Any) -> Any:
        value = config.get(key)
        return default if value is None else value

    return {
        "dataset": source,
        "data_root": config.get("data_root"),
        "data_subset": config.get("pretrain_subset"),
        "model": get("model", "cnn"),
        "norm": get("norm", "batch"),
        "scenario": "label_noise",
        "label_noise_rate": 0.0,
        "val_fraction": 0.0,
        "epochs": int(get("pretrain_epochs", get("epochs", 10))),
        # Not the trial's batch_size: a searched setting would split one source into as many
        # pretrainings (and cache files) as there are batch sizes.
        "batch_size": int(get("pretrain_batch_size", 128)),
        "optimizer": "sgd",
        "base_optimizer": "sgd",
        "lr": float(get("pretrain_lr", 0.05)),
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "lr_schedule": "cosine",
        "augment": None,
        "seed": int(get("pretrain_seed", 0)),
        "workers": 1,
        "use_gpu": bool(config.get("use_gpu", False)),
        "precision": get("precision", "fp32"),
        "sharpness_measures": (),
    }


def _pretrain_key(cfg: dict[str, Any]) -> str:
    # The device and precision do not define *which* weights are wanted; everything else does.
    defining = {k: v for k, v in cfg.items() if k not in ("use_gpu", "workers", "data_root")}
    text = json.dumps({"format": PRETRAIN_FORMAT, **defining}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _pretrain_dir() -> Path:
    env = os.environ.get("SAMTUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "pretrained"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samtune" / "pretrained"


def pretrain(config: dict[str, Any], source: str | None = None, path: str | os.PathLike | None = None) -> Path:
    """Pretrain ``config``'s model on ``source`` (default ``config["dataset"]``) and return the file.

    With ``path``, the state_dict is written there (replacing any file). Without it, the file is
    cached by a hash of `pretrain_config`: an existing one is returned at once, and concurrent
    callers (parallel trials of one sweep) wait on a file lock while the first one trains, so the
    source is pretrained once. A ``<file>.json`` beside the weights records the config and final
    metrics. Safe inside one rank of an initialised ``torch.distributed`` group (a multi-worker
    trial): it trains in this process alone, calling no collective. Raises what
    `samtune.train.fit` and `samtune.data.load_dataset` raise.
    """

    cfg = pretrain_config(config, source if source is not None else config["dataset"])
    target = Path(path).expanduser() if path is not None else _pretrain_dir() / f"{_pretrain_key(cfg)}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path is None and target.is_file():
            return target
        saved: dict[str, Tensor] = {}
        metrics = run(resolve_config(cfg), _LocalSession(None, None, alone=True), on_end=lambda model: saved.update(
            {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        torch.save(saved, tmp)
        os.replace(tmp, target)  # atomic: a waiting trial never reads half a file
        meta = {"config": cfg, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        target.with_name(target.name + ".json").write_text(json.dumps(meta, indent=1, default=str))
    return target


def pretrained_state(config: dict[str, Any]) -> dict[str, Tensor] | None:
    """The finetune scenario's starting weights when ``finetune_source`` names a dataset: pretrained
    (once, cached) by `pretrain`. None otherwise: the scenario reads a file, torchvision or MLflow
    source itself (`samtune.models.weights.load_source`)."""
    source = config.get("finetune_source")
    if config.get("scenario") != "finetune" or not source or not _is_dataset_name(str(source)):
        return None
    return read_state_dict(pretrain(config, source=str(source).strip()))

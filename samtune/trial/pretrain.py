"""Pretraining for a finetuning trial whose ``finetune_source`` names a dataset (``cifar100``,
``digits[0-4]``, ...): the trial's model is trained on it with plain SGD once, and the weights are
cached under ``$SAMTUNE_CACHE_DIR/pretrained`` (else ``~/.cache/samtune/pretrained``) by a hash of
the pretraining config, behind a file lock so parallel trials wait for one pretraining instead of
each running it. The other kinds of source (a file, torchvision weights, an MLflow URI) are read
by `samtune.models.weights`, which describes them all.
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
from samtune.trial.session import LocalSession

PRETRAIN_FORMAT = "samtune-pretrain-v1"  # part of the cache key: bump when pretraining changes


# --- sources that name a dataset -------------------------------------------------------------


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
    `samtune.trial.loop.run` and `samtune.data.load.load_dataset` raise.
    """
    cfg = pretrain_config(config, source if source is not None else config["dataset"])
    target = Path(path).expanduser() if path is not None else _pretrain_dir() / f"{_pretrain_key(cfg)}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path is None and target.is_file():
            return target
        saved: dict[str, Tensor] = {}
        metrics = run(
            resolve_config(cfg),
            LocalSession(None, None, alone=True),
            on_end=lambda model: saved.update({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}),
        )
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

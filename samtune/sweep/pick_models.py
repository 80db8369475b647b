"""The picks' final weights as MLflow models: after a cell's search, its best SGD and best SAM
trial (`samtune.sweep.results.CellResult.picks`) each get the model of their last Tune checkpoint
on their own trial run, under the artifact path ``model``, so that
``mlflow.pytorch.load_model(f"runs:/{run_id}/model")`` gives the trained network; the cell's run
names them (``samtune.picks`` = ``best_sgd:<trial key>,best_sam:<trial key>``).

A model is saved with `mlflow.pytorch.save_model` (pickled: loading it needs samtune importable,
since the network's classes are samtune's) into the sweep's folder,
``<sweep>/models/<cell slug>/<trial id>/model``, and logged through the tracker's queue as an
artifacts record like every other write: spooled while the store is away, and written by the
next driver from that folder, which therefore outlives the driver. It is built on the driver's
CPU from the checkpoint the trial left (`samtune.trial.export`): no trial computes anything
again or otherwise, so a sweep's results are the same with it. What it costs the driver is timed
per pick (`PickModel.seconds`); a resumed driver finds the saved folder and only logs it again.
A model that cannot be built (its checkpoint gone, its data moved) is skipped with a warning:
it describes a result, it does not make one.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from samtune.contract.messages import first_line
from samtune.contract.tags import PICKS_TAG
from samtune.sweep.plan import Plan
from samtune.sweep.results import CellResult, TrialRow
from samtune.sweep.tracking import Tracker
from samtune.trial.export import ModelInputs, trained_model
from samtune.trial.session import read_checkpoint

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

log = logging.getLogger(__name__)

#: The artifact path of a pick's model on its trial run.
MODEL_PATH = "model"
#: Where, in the sweep's folder, the picks' models are saved before they are logged.
MODELS_DIR = "models"


@dataclass(frozen=True)
class PickModel:
    """One pick whose model was logged: its name, its trial run's key, the seconds it took."""

    name: str
    trial_key: str
    seconds: float


def log_pick_models(plan: Plan, results: list[CellResult], tracker: Tracker, sweep_key: str) -> list[PickModel]:
    """Tag each cell's run with its picks and log each pick's model on its trial run."""
    sweep = plan.sweep
    logged = []
    for result in results:
        cell_key = f"{sweep_key}/{result.cell.slug}"
        picks = result.picks(sweep.metric, sweep.mode)
        if not picks:
            continue
        tracker.set_tags(
            cell_key, {PICKS_TAG: ",".join(f"{name}:{cell_key}/{row.trial_id}" for name, row in picks.items())}
        )
        for name, row in picks.items():
            start = time.perf_counter()
            folder = plan.sweep_dir / MODELS_DIR / result.cell.slug / row.trial_id
            try:
                save_pick_model({**sweep.base_config(result.cell), **row.params}, row, folder)
            except Exception as exc:  # noqa: BLE001  any failure: the sweep's results stand without it
                log.warning(
                    "no MLflow model for %s's %s (trial %s): %s", result.cell.label, name, row.trial_id, first_line(exc)
                )
                continue
            tracker.log_artifacts(f"{cell_key}/{row.trial_id}", folder)
            logged.append(PickModel(name, f"{cell_key}/{row.trial_id}", time.perf_counter() - start))
    if logged:
        log.info(
            "the picks' MLflow models: %d saved in %.2f s (%.2f s the longest)",
            len(logged),
            sum(p.seconds for p in logged),
            max(p.seconds for p in logged),
        )
    return logged


def save_pick_model(config: dict[str, Any], row: TrialRow, folder: Path) -> None:
    """Save the model of `row`'s last checkpoint as ``folder/model`` (unless an earlier driver
    did): whole or not at all, so a killed driver leaves no half model to log."""
    if (folder / MODEL_PATH / "MLmodel").exists():
        return
    module, inputs = checkpoint_model(config, row)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _save(module, inputs, partial / MODEL_PATH, config)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def checkpoint_model(config: dict[str, Any], row: TrialRow) -> tuple[nn.Module, ModelInputs]:
    """The network of `row`'s last checkpoint (its final weights), on the CPU in eval mode, and
    what it takes. Raises FileNotFoundError where Tune kept no checkpoint of it."""
    if row.checkpoint is None:
        raise FileNotFoundError("Tune kept no checkpoint of it")
    with row.checkpoint.as_directory() as checkpoint:
        weights = read_checkpoint(checkpoint)["model"]
    return trained_model(config, weights)


def _save(module: nn.Module, inputs: ModelInputs, path: Path, config: dict[str, Any]) -> None:
    """`mlflow.pytorch.save_model` with what it would otherwise spend seconds finding out: its pip
    requirements, and a signature from the model's known shapes (no example run through it)."""
    import mlflow.pytorch

    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    if str(config.get("model", "")).startswith("torchvision:"):
        import torchvision

        requirements.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    # Pickled, MLflow 3's default elsewhere being a traced graph that needs an example to run:
    # what loads is the samtune module itself, to evaluate, inspect or train on.
    format_ = {"serialization_format": "pickle"} if _takes_format(mlflow.pytorch.save_model) else {}
    # MLflow warns on every pickled save; a sweep saves only its own models.
    quiet = logging.getLogger("mlflow.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        mlflow.pytorch.save_model(
            module,
            str(path),
            pip_requirements=requirements,
            signature=_signature(inputs),
            metadata={
                "input": "float images [N, C, H, W] normalised by mean and std per channel; returns class logits",
                "input_shape": list(inputs.input_shape),
                "mean": list(inputs.mean),
                "std": list(inputs.std),
                "classes": list(inputs.classes),
            },
            **format_,
        )
    finally:
        quiet.setLevel(level)


def _takes_format(save_model: Any) -> bool:
    return "serialization_format" in inspect.signature(save_model).parameters


def _signature(inputs: ModelInputs) -> ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *inputs.input_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(inputs.classes)))]),
    )

"""The model measured at the end of an epoch: eval-mode error and loss on the fixed training subset,
the validation split and the test set (`evaluate`, every worker), and the sharpness measures
(`measure`, rank 0, at the epochs that measure them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from samtune.contract.metrics import SHARPNESS_SKIPPED_NOTE
from samtune.data.scenarios import Scenario
from samtune.data.transforms import to_float
from samtune.sharpness.budget import skipped_note
from samtune.sharpness.measures import measure_sharpness
from samtune.trial.epoch import all_reduce
from samtune.trial.placement import memory_share
from samtune.trial.seeding import sharpness_indices
from samtune.trial.state import TrialState


def evaluate(state: TrialState, epoch: int) -> dict[str, float]:
    """`test_error` / `test_loss`, `val_error` / `val_loss` where there is a validation split,
    and at the epochs `train_eval_every` names, `train_error` (and, where the subset holds
    flipped labels, `flipped_acc_noisy` / `flipped_acc_true`) on the fixed training subset.
    Every worker calls it."""
    scenario = state.scenario
    _sync_buffers(state.module, state.world)
    on_test = _evaluate(state, scenario.test_x, scenario.test_y)
    out = {"test_error": on_test["error"], "test_loss": on_test["loss"]}
    if len(scenario.val_y):  # else no validation split (val_fraction=0)
        on_val = _evaluate(state, scenario.val_x, scenario.val_y)
        out["val_error"], out["val_loss"] = on_val["error"], on_val["loss"]
    every = state.cfg["train_eval_every"]
    if epoch == state.cfg["epochs"] or (every and epoch % every == 0):
        on_train = _evaluate(state, state.fixed.x, state.fixed.y, y_true=state.fixed.y_true)
        out["train_error"] = on_train["error"]
        if not math.isnan(on_train["flipped_acc_noisy"]):  # the subset holds flipped labels
            out["flipped_acc_noisy"] = on_train["flipped_acc_noisy"]
            out["flipped_acc_true"] = on_train["flipped_acc_true"]
    return out


@torch.no_grad()
def _evaluate(
    state: TrialState, x: Tensor, y: Tensor, y_true: Tensor | None = None, batch: int = 1024
) -> dict[str, float]:
    """Eval-mode top-1 `error` and mean cross-entropy `loss` of the trial's model on (x, y).

    Each worker takes a strided share and the sums are all-reduced once, so every worker must
    call it. It runs the unwrapped module: a forward through DistributedDataParallel may
    broadcast buffers, a collective whose count would then depend on each worker's share. With
    `y_true` also `flipped_acc_noisy` / `flipped_acc_true`: on the examples where `y != y_true`,
    the accuracy against `y` (memorised noisy labels) and against `y_true` (NaN where none).
    """
    model, device, rank, world = state.eval_model, state.device, state.rank, state.world
    was_training = model.training
    model.eval()
    xs, ys = x[rank::world], y[rank::world]
    ts = y_true[rank::world] if y_true is not None else None
    # wrong, summed loss, examples, flipped examples, flipped predicted as noisy, as true label
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for i in range(0, len(ys), batch):
        xb = to_float(xs[i : i + batch].to(device, non_blocking=True), *state.norm)
        if state.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = ys[i : i + batch].to(device)
        with state.autocast:
            logits = model(xb)
        logits = logits.float()
        pred = logits.argmax(1)
        sums[0] += (pred != yb).sum()
        sums[1] += F.cross_entropy(logits, yb, reduction="sum")
        sums[2] += len(yb)
        if ts is not None:
            tb = ts[i : i + batch].to(device)
            flipped = yb != tb
            sums[3] += flipped.sum()
            sums[4] += (flipped & (pred == yb)).sum()
            sums[5] += (flipped & (pred == tb)).sum()
    model.train(was_training)
    return _rates(all_reduce(sums, world).tolist(), flipped=ts is not None)


def _rates(sums: list[float], flipped: bool) -> dict[str, float]:
    nan = float("nan")
    out = {"error": sums[0] / sums[2] if sums[2] else nan, "loss": sums[1] / sums[2] if sums[2] else nan}
    if flipped:
        out["flipped_acc_noisy"] = sums[4] / sums[3] if sums[3] else nan
        out["flipped_acc_true"] = sums[5] / sums[3] if sums[3] else nan
    return out


def _sync_buffers(module: nn.Module, world: int) -> None:
    """Give every worker rank 0's buffers (BatchNorm running statistics) before evaluating.

    During training each worker's statistics follow its own batches (m-sharpness groups bypass
    DDP's buffer broadcast altogether), so without this each worker would evaluate its share
    with slightly different statistics than the checkpoint, which holds rank 0's. One explicit
    broadcast per buffer, called by every worker at the same point of every epoch.
    """
    if world == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def measure(state: TrialState, epoch: int) -> dict[str, Any]:
    """The sharpness measures (`sharpness/<measure>`), at the last epoch and every
    `sharpness_every` epochs, on rank 0; empty elsewhere and at other epochs."""
    cfg = state.cfg
    every = cfg["sharpness_every"]
    if not cfg["sharpness_measures"] or not (epoch == cfg["epochs"] or (every and epoch % every == 0)):
        return {}
    if state.rank != 0:  # measured on the unwrapped module: no collectives, the others wait at report
        return {}
    return _measure_sharpness(cfg, state.module, state.scenario, state.device)


def _measure_sharpness(
    cfg: dict[str, Any], model: nn.Module, scenario: Scenario, device: torch.device
) -> dict[str, Any]:
    idx = sharpness_indices(len(scenario.train_y), cfg["seed"], cfg["sharpness_subset"])
    x = to_float(scenario.train_x[idx].to(device), scenario.mean, scenario.std)
    y = scenario.train_y[idx].to(device)
    settings = {name: dict(extra) for name, extra in (cfg["sharpness_settings"] or {}).items()}
    share = memory_share(device)
    for name in ("hessian_top_eig", "hessian_trace"):
        if name in cfg["sharpness_measures"]:
            settings.setdefault(name, {}).setdefault("memory_share", share)
    out: dict[str, Any] = measure_sharpness(
        model,
        F.cross_entropy,
        x,
        y,
        measures=cfg["sharpness_measures"],
        seed=cfg["seed"],
        budget_s=cfg["sharpness_budget_s"],
        **settings,  # type: ignore[arg-type]  # keys are measure names (checked)
    )
    note = skipped_note(out)
    if note is not None:
        out[SHARPNESS_SKIPPED_NOTE] = note
    return out

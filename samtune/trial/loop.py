"""The trial as a loop over named steps: `setup` and `restore` once, then every epoch
`train_epoch`, `evaluate`, `measure` and `report`; a diverged epoch ends the trial with a bad
result instead (`diverged_result`), and `inject_fault` lets resilience tests break a worker.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from samtune.contract.metrics import worst_values
from samtune.trial.build import backbone_lr
from samtune.trial.epoch import train_epoch
from samtune.trial.evaluate import evaluate, measure
from samtune.trial.probe import starting_point
from samtune.trial.session import Session
from samtune.trial.state import TrialState, checkpoint, restore, setup


def run(
    config: dict[str, Any],
    session: Session,
    on_end: Callable[[nn.Module], None] | None = None,
    initial_state: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Train one trial on this worker, reporting every epoch to `session`, and return the last
    epoch's metrics. A run resumed after its last epoch, or after it diverged, returns the
    checkpoint's metrics without training again. `on_end` receives the trained (unwrapped) model
    after the last epoch; `initial_state` is a finetune scenario's pretrained weights."""
    state = setup(config, session, initial_state)
    restore(state)
    if state.last.get("diverged"):
        return state.last
    start = starting_point(state)  # a finetuning's pretrained starting point, before any step
    for epoch in range(state.start_epoch, state.cfg["epochs"] + 1):
        started = time.perf_counter()
        trained = train_epoch(state, epoch)
        if trained["diverged"]:
            metrics = diverged_result(state.cfg, epoch, trained)
        else:
            metrics = epoch_metrics(state, epoch, trained, evaluate(state, epoch))
            metrics.update(measure(state, epoch))
        metrics.update(start)
        start = {}
        state.compute_time += time.perf_counter() - started
        metrics["compute_time_s"] = state.compute_time
        report(state, epoch, metrics)
        if metrics["diverged"]:
            return metrics
        inject_fault(session, epoch)
    if on_end is not None:
        on_end(state.module)
    return state.last


def epoch_metrics(
    state: TrialState, epoch: int, trained: dict[str, Any], evaluated: dict[str, float]
) -> dict[str, Any]:
    """A finished epoch's metrics from its training (`train_epoch`) and evaluation (`evaluate`),
    with the learning rates and how the perturbation and the workers were arranged."""
    metrics = {
        "epoch": epoch,
        "train_loss": trained["train_loss"],
        "train_acc_noisy": trained["train_acc_noisy"],
        "train_acc_true": trained["train_acc_true"],
        "test_error": evaluated["test_error"],
        "test_loss": evaluated["test_loss"],
        "epoch_time_s": trained["epoch_time_s"],
        "samples_per_s": trained["samples_per_s"],
        "train_time_s": trained["train_time_s"],
        "lr": state.optimizer.param_groups[0]["lr"],
        "diverged": 0,
    }
    metrics.update(evaluated)  # and the validation split's, the flipped labels', where measured
    if state.scenario.initial_state is not None:
        metrics["lr_backbone"] = backbone_lr(state.optimizer, state.scenario.backbone_lr_scale)
    if state.cfg["optimizer"] != "sgd":
        plan = state.plan
        metrics.update(
            m_effective=plan.m,
            m_workers=plan.workers_per_eps,
            m_groups_per_worker=plan.groups_per_worker,
            m_per_worker_batch=plan.per_worker_batch,
            m_plan=plan.describe(),
        )
    if "train_error" in evaluated:  # not at every epoch with train_eval_every
        metrics["generalization_gap"] = metrics["test_error"] - metrics["train_error"]
    if state.placement:
        metrics.update(nodes=len(set(state.placement)), placement=",".join(state.placement))
    if state.rounds is not None:
        metrics["allreduce_per_step"] = state.rounds.count() / state.steps
    return metrics


def diverged_result(cfg: dict[str, Any], epoch: int, trained: dict[str, Any]) -> dict[str, Any]:
    """The last result of a trial whose loss diverged in epoch `epoch`: every metric a sweep may
    optimise at its worst (Tune refuses a result that lacks the sweep's metric, and a finite
    worst value keeps the trial a bad result), with the epoch's times."""
    return {
        "epoch": epoch,
        "diverged": 1,
        **worst_values(cfg["divergence_loss"]),
        "epoch_time_s": trained["epoch_time_s"],
        "train_time_s": trained["train_time_s"],
    }


def report(state: TrialState, epoch: int, metrics: dict[str, Any]) -> None:
    """Report epoch `epoch`'s metrics and checkpoint; they are the trial's last result from now on."""
    state.session.report(metrics, checkpoint(state, epoch, metrics))
    state.last = metrics


def inject_fault(session: Session, epoch: int) -> None:
    """Fault injection for resilience tests: ``SAMTUNE_FAULT_KILL_EPOCH=k`` SIGKILLs this worker
    process right after epoch k's checkpoint was reported (once per trial: a restarted worker
    resumes after epoch k and never reports k again); ``SAMTUNE_FAULT_RAISE_EPOCH=k`` raises
    there instead, as a bug in a trial would. Not in a session that trains alone (a pretraining
    stage inside a worker)."""
    if not session.inject_faults:
        return
    if os.environ.get("SAMTUNE_FAULT_KILL_EPOCH") == str(epoch):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SAMTUNE_FAULT_RAISE_EPOCH") == str(epoch):
        raise RuntimeError(f"injected fault after epoch {epoch} (SAMTUNE_FAULT_RAISE_EPOCH)")

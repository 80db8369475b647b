"""How big a sweep is and how long it may take, said before it starts.

The size is counted from the sweep alone: trial-epochs of the search (every trial run to the
end: ASHA only shortens it) and of the confirmation stage (its first round, then every further
round the verdicts may need, up to ``max_confirm_seeds``). The duration comes from a short
measurement on this machine: a few training steps of the sweep's model at its batch size, with
as many threads as a trial gets, and a few evaluation passes, plus `RUN_OVERHEAD_S` a run. A SAM
step is counted as two SGD steps (its two forward-backward passes); the end-of-training sharpness
measures are not counted.
A sweep whose longest case passes `LIMIT_S` (or, where nothing can be measured here, whose size
passes `LIMIT_EPOCHS`) is refused unless the user says ``--yes``: a typo such as
``trials=10**9`` should cost a message, not a cluster for a year.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from samtune.data.load import load_dataset
from samtune.data.scenarios import split_sizes
from samtune.models.zoo import build_model
from samtune.sweep.ablations import planned_runs
from samtune.sweep.progress import duration
from samtune.sweep.study import Sweep
from samtune.trial.config import resolve_config

#: Longest a sweep may be estimated to take, in its longest case, without --yes: two days.
LIMIT_S = 48 * 3600.0
#: Most trial-epochs a sweep may hold without --yes where no duration can be measured here.
LIMIT_EPOCHS = 1_000_000
#: SAM's cost in SGD steps: a forward-backward pass to climb, one to descend.
SAM_STEPS = 2.0
#: What a run costs beyond its epochs: starting its process, reading its data, building its
#: model, and the gap before the next run starts. Measured on the embedded study on 2 CPU cores
#: (144 runs: 1.8 s inside each run, 1.2 s between runs); larger models and GPUs pay more.
RUN_OVERHEAD_S = 3.0
# Timed steps after one warm-up step (allocations, kernel choice): enough for a stable median.
TIMED_STEPS = 3


@dataclass
class Size:
    """A sweep's work in trial-epochs: the search, the confirmation's first round, and all its
    rounds at most."""

    cells: int
    trials: int
    epochs: int
    search: int
    confirm_first: int
    confirm_most: int

    @property
    def most(self) -> int:
        return self.search + self.confirm_most


@dataclass
class Estimate:
    """A sweep's size, and (where this machine could measure it) its duration: `about` (the
    search and the confirmation's first round) and `at_most` (every round), in seconds."""

    size: Size
    epoch_s: float | None
    slots: int | None
    about: float | None
    at_most: float | None
    why_not: str = ""

    def text(self) -> str:
        """One line for the terminal: the size, then the duration and how it was measured."""
        s = self.size
        confirm = (
            f" + confirmation {s.confirm_first:,} trial-epochs (at most {s.confirm_most:,})" if s.confirm_most else ""
        )
        size = (
            f"size: {s.cells} cell(s) x {s.trials:,} trials x {s.epochs:,} epochs = {s.search:,} trial-epochs{confirm}"
        )
        if self.about is None or self.at_most is None or self.epoch_s is None:
            return f"{size}; no duration estimate: {self.why_not}"
        where = f"{self.slots} trial(s) at once" if self.slots else "one trial at a time (a cluster's size divides it)"
        return (
            f"{size}; one epoch measured here at {self.epoch_s:.2g} s (SGD), so about {duration(self.about)} "
            f"on {where}, at most {duration(self.at_most)} if every verdict needs every seed"
        )

    def too_big(self) -> str:
        """Why this sweep needs --yes to start ('' when it does not)."""
        if self.at_most is not None:
            if self.at_most > LIMIT_S:
                return f"it may take {duration(self.at_most)} (more than {duration(LIMIT_S)})"
            return ""
        if self.size.most > LIMIT_EPOCHS:
            return f"it holds {self.size.most:,} trial-epochs (more than {LIMIT_EPOCHS:,})"
        return ""


def sweep_size(sweep: Sweep, has_sam_baseline: bool = True) -> Size:
    """The trial-epochs of `sweep`: its search run to the end, and its confirmation stage (best
    SGD, best SAM, the SAM baseline and each ablation's value on the first round's seeds, m=None
    left out as the best SAM's own; best SGD and
    best SAM on every further seed up to ``max_confirm_seeds``)."""
    cells = sweep.cells()
    search = len(cells) * sweep.trials * sweep.epochs
    first = most = 0
    if sweep.confirm_seeds:
        later = max(sweep.design().looks[-1] - sweep.confirm_seeds, 0)
        for cell in cells:
            ablated = sweep.ablated(cell)
            own = int(None in (ablated.get("m") or ()))
            picks = 2 + int(has_sam_baseline) + planned_runs(ablated) - own
            first += picks * sweep.confirm_seeds * sweep.epochs
            most += (picks * sweep.confirm_seeds + 2 * later) * sweep.epochs
    return Size(len(cells), sweep.trials, sweep.epochs, search, first, most)


def estimate(sweep: Sweep, sampled: list[dict[str, Any]], slots: int | None, has_sam_baseline: bool = True) -> Estimate:
    """`sweep`'s size and duration on `slots` trials at once (None: unknown, a cluster joined),
    measured on this machine with the settings the space produced (`sampled`)."""
    size = sweep_size(sweep, has_sam_baseline)
    config = resolve_config({**sweep.base_config(sweep.cells()[0]), **(sampled[0] if sampled else {})})
    if sweep.gpus_per_trial > 0 and not torch.cuda.is_available():
        return Estimate(size, None, slots, None, None, "its trials train on GPUs, and this machine has none")
    epoch_s = measure_epoch(sweep, config)
    sam_share = sum(p.get("optimizer") in ("sam", "asam") for p in sampled) / len(sampled) if sampled else 0.0
    per_epoch = epoch_s * (1.0 + (SAM_STEPS - 1.0) * sam_share)
    at_once = max(slots or 1, 1)
    # The confirmation stage is SGD and SAM picks in equal measure.
    confirm_epoch = epoch_s * (1.0 + SAM_STEPS) / 2
    runs = RUN_OVERHEAD_S / max(sweep.epochs, 1)  # per trial-epoch
    about = (size.search * (per_epoch + runs) + size.confirm_first * (confirm_epoch + runs)) / at_once
    at_most = (size.search * (epoch_s * SAM_STEPS + runs) + size.confirm_most * (confirm_epoch + runs)) / at_once
    return Estimate(size, epoch_s, slots, about, at_most)


def measure_epoch(sweep: Sweep, config: dict[str, Any]) -> float:
    """Seconds of one SGD epoch of the sweep's model on this machine: steps over the cell's
    training split at its batch size, and evaluation passes over its training, validation and test sets."""
    dataset = load_dataset(sweep.dataset, sweep.fixed.get("data_root"))
    sizes = split_sizes(len(dataset.train_y), dataset.num_classes, config)
    device = torch.device("cuda" if sweep.gpus_per_trial > 0 else "cpu")
    model = build_model(str(config["model"]), dataset.num_classes, dataset.input_shape).to(device)
    per_worker = max(int(config["batch_size"]) // max(int(config.get("workers") or 1), 1), 1)
    x = torch.randn(per_worker, *dataset.input_shape, device=device)
    y = torch.randint(0, dataset.num_classes, (per_worker,), device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    try:
        step_s = _median_seconds(lambda: _sgd_step(model, x, y))
        with torch.no_grad():
            model.eval()
            forward_s = _median_seconds(lambda: model(x))
    finally:
        torch.set_num_threads(threads)
    steps = math.ceil(sizes.train / max(int(config["batch_size"]), 1))
    # Every epoch evaluates the validation and test sets, and the training set (train_eval_every).
    evaluated = math.ceil((sizes.train + sizes.val + len(dataset.test_y)) / per_worker)
    return steps * step_s + evaluated * forward_s


def _sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-1e-3)


def _median_seconds(work: Any) -> float:
    work()  # warm-up: first-call allocations and kernel choices are not a step's cost
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

"""A finetuning trial's starting point: the pretrained backbone with a head fit to the target.

A finetuned model's test error says little about what finetuning did without the error it
started from. A fresh head gives chance-level error, so the starting point is the pretrained
backbone, frozen, under a linear head fit to the target's training labels (the labels the trial
trains on: noisy in a noisy cell), a linear probe. Its test and validation error are reported
with the trial's first epoch (`pretrained_test_error`, `pretrained_val_error`), measured before
the first step.

The backbone runs in eval mode (BatchNorm on its pretrained running statistics); the features
are the head's inputs. The head is multinomial logistic regression with a small L2 penalty, fit
by full-batch L-BFGS from zero: a convex problem, so the fit is deterministic and draws nothing
from any random stream (a trial's streams stay as they were). Every worker fits the same head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from samtune.data.transforms import to_float
from samtune.models.heads import find_head
from samtune.trial.state import TrialState

# L2 weight on the head: enough to keep separable features from driving the weights to
# infinity, small next to the loss.
L2 = 1e-4
_MAX_ITER = 300


def starting_point(state: TrialState) -> dict[str, float]:
    """`pretrained_test_error` (and `pretrained_val_error` with a validation split) of a finetuning
    trial that has not trained yet; empty for any other trial, and for a resumed one (its first
    epoch already reported them)."""
    scenario = state.scenario
    if scenario.initial_state is None or state.start_epoch != 1:
        return {}
    train = _features(state, state.train.x)
    weight, bias = fit_head(train, state.train.y, scenario.num_classes)
    out = {"pretrained_test_error": _error(state, scenario.test_x, scenario.test_y, weight, bias)}
    if len(scenario.val_y):
        out["pretrained_val_error"] = _error(state, scenario.val_x, scenario.val_y, weight, bias)
    return out


def fit_head(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the L2-penalised multinomial logistic regression of `labels` on
    `features`, by L-BFGS from zero.

    >>> x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.2]])
    >>> w, b = fit_head(x, torch.tensor([1, 0, 1, 0]), 2)
    >>> (x @ w.T + b).argmax(1).tolist()
    [1, 0, 1, 0]
    """
    features = features.float()
    weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    solver = torch.optim.LBFGS([weight, bias], max_iter=_MAX_ITER, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        solver.zero_grad()
        value = F.cross_entropy(features @ weight.T + bias, labels) + L2 * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        solver.step(loss)
    return weight.detach(), bias.detach()


@torch.no_grad()
def _features(state: TrialState, x: Tensor, batch: int = 1024) -> Tensor:
    """The head's inputs for `x` (uint8, as stored), the backbone in eval mode."""
    model = state.eval_model
    _, head = find_head(model)
    captured: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].float()))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch):
            xb = to_float(x[i : i + batch].to(state.device), *state.norm)
            if state.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with state.autocast:
                model(xb)
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured).flatten(1)


def _error(state: TrialState, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> float:
    logits = _features(state, x) @ weight.T + bias
    return float((logits.argmax(1) != y.to(logits.device)).float().mean())

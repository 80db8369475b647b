"""Cheaper SAM: which steps pay for SAM's second pass, and what the other steps do instead.

A full SAM step costs two sequential forward/backward passes. Each variant here decides, step by
step, whether to take that step or a one-pass step (or, for ``msam`` and ``sampa``, which other
step to take), and keeps the state its rule needs (a counter, a seeded random stream, running
statistics, a stored direction). `samtune.optim.sam.SAM` and
`samtune.optim.step.sam_step` carry out the decision; the state travels in the optimizer's
`state_dict()`, so a resumed run continues the same schedule.

Steps are numbered t = 0, 1, 2, ... from the start of training; T is the planned number of steps
(`total_steps`), needed only by the scheduled rules.

- ``full``: SAM at every step (Foret et al., 2020).
- ``every_k``: SAM at steps with t % k == 0, a plain base-optimizer step otherwise (the simple
  baseline, as MosaicML Composer's SAM `interval`). k = 1 is ``full`` exactly.
- ``rst``: randomized SAM (Zhao et al., 2022, "Randomized Sharpness-Aware Training for Boosting
  Computational Efficiency in Deep Learning"): at step t a Bernoulli trial with probability p_t
  picks SAM, else a plain step. U_t is the t-th `torch.rand` draw of a CPU `torch.Generator`
  seeded with `seed`; SAM iff U_t < p_t. Schedules: ``constant`` p_t = p, or ``linear``
  p_t = p_start + (p - p_start) * min(1, t / T). This is the paper's RST with these two
  scheduling functions only; a SAM step here is a full SAM step at the optimizer's rho. The
  paper's G-RST (its generalised form, which also adjusts how strongly the sharpness term is
  weighted for a given schedule) is not implemented.
- ``looksam``: LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware
  Minimization", Algorithm 1). Every k steps (t % k == 0) a full SAM step, which also stores the
  component of the SAM gradient g_s orthogonal to the plain gradient g,
  g_v = g_s - (<g, g_s> / ||g||^2) g. On the other steps one pass gives g and the base optimizer
  steps with g + alpha * ||g|| / ||g_v|| * g_v. Norms and inner products run over all parameters
  together. A non-finite g_v (an overflowing fp16 step) is not stored: the previous one stays.
- ``ae_sam``: AE-SAM (Jiang et al., ICLR 2023, "An Adaptive Policy to Employ Sharpness-Aware
  Minimization", Algorithm 1). One pass gives g_t; with s_t = ||g_t||^2,
  mu_t = delta * mu_{t-1} + (1 - delta) * s_t and
  var_t = delta * var_{t-1} + (1 - delta) * (s_t - mu_t)^2 (mu_{-1} = var_{-1} = 0). SAM iff
  s_t >= mu_t + c_t * sqrt(var_t), with c_t = (t / T) * lambda1 + (1 - t / T) * lambda2; else
  the plain step with g_t. The defaults (lambda1 = -1, lambda2 = 1) take SAM rarely early on and
  more often towards the end. A non-finite s_t (an overflowing fp16 step) leaves the statistics
  alone and takes the plain step.
- ``msam``: Momentum-SAM (Becker et al., 2023, arXiv 2401.12033): every step is one pass, at the
  weights moved against the base optimizer's normalised momentum buffer; see `samtune.optim.msam`.
- ``sampa``: SAMPa-lambda (Xie, Pethick and Cevher, NeurIPS 2024): the perturbation comes from
  the gradient at an auxiliary point computed in the previous step, so the step's two gradients
  do not depend on each other; with an even number of DDP workers, paired ranks compute one each
  and one all-reduce exchanges them; see `samtune.optim.sampa`.

Under DistributedDataParallel every worker takes the same decision: the random stream and the
counters are identical on every worker, AE-SAM uses the workers' mean of their local s_t, and
LookSAM's g is averaged over the workers before g_v is formed. ``looksam`` and ``ae_sam`` need
the whole local batch's gradient, so they don't combine with m-sharpness groups (m smaller than
the local batch), nor do ``msam`` and ``sampa`` (one perturbation for the whole step);
``every_k`` and ``rst`` do.

Trial-config keys (read by `variant_from_config`; unset or None means the default in brackets):

    sam_variant      "full" | "every_k" | "rst" | "looksam" | "ae_sam" | "msam" | "sampa"
                                                                                 ["full"]
    sam_k            int >= 1: every_k's period, LookSAM's recompute period  [every_k 2, looksam 5]
    sam_p            float in [0, 1]: rst's probability (the end value of the linear schedule) [0.5]
    rst_schedule     "constant" | "linear"                                       ["constant"]
    rst_p_start      float in [0, 1]: the linear schedule's value at t = 0       [0.0]
    looksam_alpha    float >= 0: weight of the reused direction                  [0.7]
    ae_sam_lambda1   float: threshold factor c_t at the end of training          [-1.0]
    ae_sam_lambda2   float: threshold factor c_t at the start of training        [1.0]
    ae_sam_delta     float in (0, 1): forgetting factor of the running mean/var  [0.9]
    sam_total_steps  int >= 1: T, for rst's linear schedule and ae_sam's c_t     [None]
    sam_seed         int: rst's random stream                                    [seed * 1000 + 606]
    sampa_lambda     float in [0, 1]: SAMPa's weight of the auxiliary gradient   [0.2]

Knobs that do not belong to the chosen variant are ignored (a search space may carry them all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

# What a variant asks for at the start of a step.
SAM_STEP = "sam"  # two passes: gradient at w, then at w + eps
PLAIN_STEP = "plain"  # one pass, the base optimizer's step
ADAPTIVE_STEP = "adaptive"  # one pass, then `decide(squared gradient norm)` picks
MOMENTUM_STEP = "momentum"  # one pass, at w + eps with eps from the base optimizer's momentum
PAIRED_STEP = "paired"  # two independent passes (SAMPa), in parallel on paired workers

# Keeps divisions finite when a gradient or a stored direction is exactly zero.
_FLOOR = 1e-12

# rst's default stream is set apart from the trial seed, which also seeds initialisation.
_RST_STREAM = 606


class SAMVariant:
    """Base class: the step counter and the count of two-pass steps, and state round trips.

    Subclasses implement `plan()`, for ``ADAPTIVE_STEP`` `decide()` and, with `keeps_direction`,
    `store()` and `reuse()`; the caller reports each finished step with `finish(took_sam)`.
    """

    name: ClassVar[str] = ""
    uses_whole_batch_gradient: ClassVar[bool] = False  # True: no m-sharpness groups
    whole_batch_reason: ClassVar[str] = "decides from the whole local batch's gradient"
    keeps_direction: ClassVar[bool] = False  # True: LookSAM's store/reuse hooks apply

    def __init__(self) -> None:
        self.steps = 0  # steps taken so far (t of the next step)
        self.sam_steps = 0  # of which took two passes

    def plan(self) -> str:
        raise NotImplementedError

    def decide(self, squared_grad_norm: float) -> bool:
        raise NotImplementedError(f"{self.name} decides before the first pass")

    def store(self, first: list[Tensor | None], second: list[Tensor | None]) -> None:
        raise NotImplementedError(f"{self.name} keeps no direction")

    def reuse(self, grads: list[Tensor | None]) -> None:
        raise NotImplementedError(f"{self.name} keeps no direction")

    def finish(self, took_sam: bool) -> None:
        self.steps += 1
        self.sam_steps += int(took_sam)

    @property
    def passes(self) -> int:
        """Forward/backward passes taken so far: one per step plus one per SAM step."""
        return self.steps + self.sam_steps

    def settings(self) -> dict[str, Any]:
        """The knobs, as given; two variants with equal name and settings are the same rule."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings(), "steps": self.steps, "sam_steps": self.sam_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`. Raises ValueError when it belongs to another variant or other
        settings (resuming would silently change the rule)."""
        if state.get("name") != self.name or dict(state.get("settings", {})) != self.settings():
            raise ValueError(
                f"the checkpoint's SAM variant {state.get('name')!r} with settings "
                f"{dict(state.get('settings', {}))} differs from this run's {self.name!r} with "
                f"{self.settings()}; resume with the same sam_variant and knobs"
            )
        self.steps = int(state["steps"])
        self.sam_steps = int(state["sam_steps"])

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({knobs})"


class FullSAM(SAMVariant):
    """SAM at every step."""

    name = "full"

    def plan(self) -> str:
        return SAM_STEP


class EveryKSAM(SAMVariant):
    """SAM at steps t with t % k == 0, plain steps in between."""

    name = "every_k"

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.k = _check_int("sam_k", k, minimum=1)

    def plan(self) -> str:
        return SAM_STEP if self.steps % self.k == 0 else PLAIN_STEP

    def settings(self) -> dict[str, Any]:
        return {"k": self.k}


class RandomizedSAM(SAMVariant):
    """SAM with probability p_t at step t, from a seeded Bernoulli stream (RST)."""

    name = "rst"
    SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "linear")

    def __init__(
        self,
        p: float = 0.5,
        schedule: str = "constant",
        p_start: float = 0.0,
        total_steps: int | None = None,
        seed: int = _RST_STREAM,
    ) -> None:
        super().__init__()
        self.p = _check_probability("sam_p", p)
        if schedule not in self.SCHEDULES:
            raise ValueError(f"rst_schedule={schedule!r} is not one of {self.SCHEDULES}")
        self.schedule = schedule
        self.p_start = _check_probability("rst_p_start", p_start)
        # T matters to the linear schedule only; kept out of a constant rule's settings so a
        # changed epoch count does not make it a different rule.
        self.total_steps = (
            None if total_steps is None or schedule == "constant" else _check_int("sam_total_steps", total_steps, 1)
        )
        if schedule == "linear" and self.total_steps is None:
            raise ValueError(
                "rst_schedule='linear' moves p over the whole run: give the planned "
                "number of steps (sam_total_steps / total_steps)"
            )
        self.seed = _check_int("sam_seed", seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def probability(self, t: int) -> float:
        """p_t, the chance that step t is a SAM step."""
        if self.schedule == "constant":
            return self.p
        if self.total_steps is None:
            raise TypeError("rst's linear schedule needs total_steps")
        return self.p_start + (self.p - self.p_start) * min(1.0, t / self.total_steps)

    def plan(self) -> str:
        # One draw per step whatever p_t is, so the stream position is the step count.
        u = float(torch.rand((), generator=self._generator))
        return SAM_STEP if u < self.probability(self.steps) else PLAIN_STEP

    def settings(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "schedule": self.schedule,
            "p_start": self.p_start,
            "total_steps": self.total_steps,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._generator.set_state(state["generator"])


class LookSAM(SAMVariant):
    """SAM every k steps, storing g_v; in between g + alpha * ||g|| / ||g_v|| * g_v (one pass)."""

    name = "looksam"
    uses_whole_batch_gradient = True
    keeps_direction = True

    def __init__(self, k: int = 5, alpha: float = 0.7) -> None:
        super().__init__()
        self.k = _check_int("sam_k", k, minimum=1)
        if not _is_number(alpha) or not alpha >= 0:
            raise ValueError(f"looksam_alpha must be a number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.direction: list[Tensor | None] | None = None  # g_v per parameter, None: no grad

    def plan(self) -> str:
        # Without a stored direction (first step) there is nothing to reuse.
        if self.steps % self.k == 0 or self.direction is None:
            return SAM_STEP
        return PLAIN_STEP

    @torch.no_grad()
    def store(self, first: list[Tensor | None], second: list[Tensor | None]) -> None:
        """From the plain gradient g (`first`) and the SAM gradient g_s (`second`), one entry per
        optimizer parameter (None: no gradient), keep g_v = g_s - (<g, g_s> / ||g||^2) g.

        A g_v with an inf or nan (an fp16 step that overflowed, which the `GradScaler` skips) is
        dropped and the previous g_v kept: reused, it would turn every plain step up to the next
        SAM step into a skipped one. Checking costs one host sync per SAM step (every k steps).
        """
        pairs = [(g, s) for g, s in zip(first, second) if g is not None and s is not None]
        if not pairs:
            self.direction = [None] * len(first)
            return
        dot = _total(torch._foreach_mul([g for g, _ in pairs], [s for _, s in pairs]))
        g_sq = _total(torch._foreach_mul([g for g, _ in pairs], [g for g, _ in pairs]))
        coef = dot / (g_sq + _FLOOR)
        direction = [
            None if s is None else (s.clone() if g is None else s - coef.to(s.device) * g)
            for g, s in zip(first, second)
        ]
        stored = [v for v in direction if v is not None]
        device = stored[0].device
        if bool(torch.stack([torch.isfinite(v).all().to(device) for v in stored]).all()):
            self.direction = direction

    @torch.no_grad()
    def reuse(self, grads: list[Tensor | None]) -> None:
        """In place on `grads` (one entry per optimizer parameter): g += alpha * ||g|| / ||g_v|| * g_v.

        Raises ValueError when the parameter list differs from the one g_v was stored for."""
        if self.direction is None:
            raise ValueError("LookSAM has no stored direction yet: the first step must be a SAM step")
        if len(grads) != len(self.direction):
            raise ValueError(
                f"LookSAM stored g_v for {len(self.direction)} parameters, the optimizer now has {len(grads)}"
            )
        live = [g for g in grads if g is not None]
        stored = [v for v in self.direction if v is not None]
        if not live or not stored:
            return
        g_norm = _total([n * n for n in torch._foreach_norm(live)]).sqrt()
        v_norm = _total([n * n for n in torch._foreach_norm(stored)]).sqrt()
        scale = self.alpha * g_norm / (v_norm + _FLOOR)
        for g, v in zip(grads, self.direction):
            if g is not None and v is not None:
                g.add_(v.to(g.device, g.dtype) * scale.to(g.device))

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha}

    def state_dict(self) -> dict[str, Any]:
        direction = (
            None if self.direction is None else [None if v is None else v.detach().clone() for v in self.direction]
        )
        return {**super().state_dict(), "direction": direction}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        direction = state.get("direction")
        self.direction = None if direction is None else list(direction)


class AESAM(SAMVariant):
    """SAM when the squared gradient norm is high against its running mean and variance."""

    name = "ae_sam"
    uses_whole_batch_gradient = True

    def __init__(
        self, lambda1: float = -1.0, lambda2: float = 1.0, delta: float = 0.9, total_steps: int | None = None
    ) -> None:
        super().__init__()
        for key, value in (("ae_sam_lambda1", lambda1), ("ae_sam_lambda2", lambda2)):
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
        if not _is_number(delta) or not 0.0 < delta < 1.0:
            raise ValueError(
                f"ae_sam_delta must be in (0, 1) (the forgetting factor of the running "
                f"mean and variance), got {delta!r}"
            )
        self.lambda1, self.lambda2, self.delta = float(lambda1), float(lambda2), float(delta)
        self.total_steps = None if total_steps is None else _check_int("sam_total_steps", total_steps, 1)
        if self.total_steps is None and self.lambda1 != self.lambda2:
            raise ValueError(
                "ae_sam's threshold c_t moves from ae_sam_lambda2 to ae_sam_lambda1 "
                "over the run: give the planned number of steps (sam_total_steps / "
                "total_steps), or set ae_sam_lambda1 == ae_sam_lambda2"
            )
        self.mean = 0.0
        self.var = 0.0

    def threshold_factor(self, t: int) -> float:
        """c_t = (t / T) * lambda1 + (1 - t / T) * lambda2 (constant when lambda1 == lambda2)."""
        if self.total_steps is None:
            return self.lambda2
        frac = min(1.0, t / self.total_steps)
        return frac * self.lambda1 + (1.0 - frac) * self.lambda2

    def plan(self) -> str:
        return ADAPTIVE_STEP

    def decide(self, squared_grad_norm: float) -> bool:
        s = float(squared_grad_norm)
        if not math.isfinite(s):
            return False
        self.mean = self.delta * self.mean + (1.0 - self.delta) * s
        self.var = self.delta * self.var + (1.0 - self.delta) * (s - self.mean) ** 2
        return s >= self.mean + self.threshold_factor(self.steps) * math.sqrt(self.var)

    def settings(self) -> dict[str, Any]:
        return {"lambda1": self.lambda1, "lambda2": self.lambda2, "delta": self.delta, "total_steps": self.total_steps}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.mean, self.var = float(state["mean"]), float(state["var"])


class MomentumSAM(SAMVariant):
    """MSAM: one pass per step, at w minus rho times the normalised momentum buffer.

    The step itself is `samtune.optim.msam` (its docstring states what it computes); this keeps
    only the step count: the direction lives in the base optimizer's state, which the SAM
    optimizer's `state_dict()` already carries.
    """

    name = "msam"
    uses_whole_batch_gradient = True
    whole_batch_reason = "takes one perturbation per step for the whole local batch"

    def plan(self) -> str:
        return MOMENTUM_STEP


class SAMPa(SAMVariant):
    """SAMPa-lambda: SAM's two gradients made independent, so two workers can take one each.

    The step is `samtune.optim.sampa` (its docstring states the update). Kept here between steps:
    the gradient at the auxiliary point y_t (all workers' mean; None before the first step) and
    the previous step's local batch, on which the next perturbed gradient is taken.
    """

    name = "sampa"
    uses_whole_batch_gradient = True
    whole_batch_reason = "takes one perturbation per step for the whole local batch"

    def __init__(self, lam: float = 0.2) -> None:
        super().__init__()
        self.lam = _check_probability("sampa_lambda", lam)
        self.aux_grad: list[Tensor] | None = None
        self.previous: tuple[Tensor, Tensor] | None = None

    def plan(self) -> str:
        return PAIRED_STEP

    def settings(self) -> dict[str, Any]:
        return {"lam": self.lam}

    def state_dict(self) -> dict[str, Any]:
        aux = None if self.aux_grad is None else [None if g is None else g.detach().clone() for g in self.aux_grad]
        previous = None if self.previous is None else tuple(t.detach().clone() for t in self.previous)
        return {**super().state_dict(), "aux_grad": aux, "previous": previous}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        aux, previous = state.get("aux_grad"), state.get("previous")
        self.aux_grad = None if aux is None else list(aux)
        self.previous = None if previous is None else tuple(previous)


VARIANTS: dict[str, type[SAMVariant]] = {
    cls.name: cls for cls in (FullSAM, EveryKSAM, RandomizedSAM, LookSAM, AESAM, MomentumSAM, SAMPa)
}


def make_variant(name: str, **knobs: Any) -> SAMVariant:
    """The variant `name` with its constructor's knobs (e.g. `make_variant("looksam", k=5)`).

    Raises ValueError for an unknown name or a knob the variant doesn't have.
    """
    if name not in VARIANTS:
        raise ValueError(f"sam_variant={name!r} is not one of {tuple(VARIANTS)}")
    try:
        return VARIANTS[name](**knobs)
    except TypeError as err:  # an unexpected keyword
        raise ValueError(f"sam_variant={name!r} does not take {sorted(knobs)}: {err}") from None


def variant_from_config(config: Mapping[str, Any], total_steps: int | None = None) -> SAMVariant:
    """The variant a trial config asks for (keys in the module docstring).

    `total_steps` (T) overrides ``sam_total_steps``; a trainer that knows its epoch length
    passes it here. Raises ValueError naming the offending key for unknown names and
    out-of-range knobs, and for scheduled rules without T.
    """

    def get(key: str, default: Any) -> Any:
        value = config.get(key)
        return default if value is None else value

    name = get("sam_variant", "full")
    if total_steps is None:
        total_steps = config.get("sam_total_steps")
    if name == "full":
        return FullSAM()
    if name == "every_k":
        return EveryKSAM(k=get("sam_k", 2))
    if name == "rst":
        seed = config.get("sam_seed")
        if seed is None:
            seed = _check_int("seed", get("seed", 0)) * 1000 + _RST_STREAM
        return RandomizedSAM(
            p=get("sam_p", 0.5),
            schedule=get("rst_schedule", "constant"),
            p_start=get("rst_p_start", 0.0),
            total_steps=total_steps,
            seed=seed,
        )
    if name == "looksam":
        return LookSAM(k=get("sam_k", 5), alpha=get("looksam_alpha", 0.7))
    if name == "ae_sam":
        return AESAM(
            lambda1=get("ae_sam_lambda1", -1.0),
            lambda2=get("ae_sam_lambda2", 1.0),
            delta=get("ae_sam_delta", 0.9),
            total_steps=total_steps,
        )
    if name == "msam":
        return MomentumSAM()
    if name == "sampa":
        return SAMPa(lam=get("sampa_lambda", 0.2))
    raise ValueError(f"sam_variant={name!r} is not one of {tuple(VARIANTS)}")


# -- helpers -------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{key} must be an integer{bound}, got {value!r}")
    return value


def _check_probability(key: str, value: Any) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _total(parts: Sequence[Tensor]) -> Tensor:
    """Sum of per-parameter partial sums, on the first tensor's device, in float64 (the inner
    products of a few million terms stay exact enough to reproduce the formula)."""
    device = parts[0].device
    return torch.stack([p.sum().to(device, torch.float64) for p in parts]).sum()


def as_variant(variant: SAMVariant | str | Mapping[str, Any]) -> SAMVariant:
    if isinstance(variant, SAMVariant):
        return variant
    if isinstance(variant, str):
        return make_variant(variant)
    if isinstance(variant, Mapping):
        return variant_from_config(variant)
    raise ValueError(
        f"variant must be a SAMVariant, a variant name or a trial config dict, got {type(variant).__name__}"
    )

"""Cheaper SAM variants: which steps take two passes, and what each step computes, checked
against the papers' rules written out by hand in this file."""

import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samtune.optim.sam import SAM
from samtune.optim.step import sam_step
from samtune.optim.variants import (
    AESAM,
    EveryKSAM,
    FullSAM,
    LookSAM,
    RandomizedSAM,
    make_variant,
    variant_from_config,
)

RHO, LR, MOMENTUM, WD = 0.2, 0.1, 0.9, 1e-3


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def batches(steps, n=24, seed=1):
    """A different batch every step, so gradient norms move from step to step."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 6, generator=g, dtype=torch.float64) * (1 + (t % 3)), torch.randint(0, 3, (n,), generator=g))
        for t in range(steps)
    ]


def sam_optimizer(model, variant=None, **kwargs):
    settings = dict(rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    settings.update(kwargs)
    return SAM(model.parameters(), variant=variant, **settings)


class PassCounter:
    """Counts forward passes of the model, step by step."""

    def __init__(self, model):
        self.count = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


def run(model, opt, data, variant=None, m=None):
    """sam_step over `data`; returns the passes each step took."""
    counter = PassCounter(model)
    pattern = []
    for x, y in data:
        before = counter.count
        sam_step(model, F.cross_entropy, x, y, opt, m=m, variant=variant)
        pattern.append(counter.count - before)
    return pattern


def run_with_closure(model, opt, data):
    counter = PassCounter(model)
    pattern = []
    for x, y in data:
        before = counter.count

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        pattern.append(counter.count - before)
    return pattern


# -- an independent reference: SAM / plain / LookSAM steps written out with autograd -----------


def reference_run(model, data, rule):
    """SGD with momentum and weight decay, where `rule(t, g)` picks the step: "sam" (gradient at
    w + rho g/||g||), "plain" (g), or a tensor list (use it as the gradient). `rule` may also
    receive the SAM gradient through `rule.after_sam(g, g_s)`. Returns (weights, pattern)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [None] * len(params)
    pattern = []
    for t, (x, y) in enumerate(data):

        def grad_at(ws, x=x, y=y):
            ws = [w.clone().requires_grad_() for w in ws]
            loss = F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ws)), (x,)), y)
            return list(torch.autograd.grad(loss, ws))

        g = grad_at(params)
        choice = rule(t, g)
        if isinstance(choice, str) and choice == "sam":
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            d = grad_at([p + RHO * gi / norm for p, gi in zip(params, g)])
            if hasattr(rule, "after_sam"):
                rule.after_sam(g, d)
            pattern.append(2)
        elif isinstance(choice, str):
            d = g
            pattern.append(1)
        else:
            d = choice
            pattern.append(1)
        for i, (p, di) in enumerate(zip(params, d)):
            di = di + WD * p
            bufs[i] = di.clone() if bufs[i] is None else MOMENTUM * bufs[i] + di
            params[i] = p - LR * bufs[i]
    return params, pattern


def assert_weights(model, expected):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-11)


# -- every_k ------------------------------------------------------------------------------------


def test_every_k_takes_sam_on_multiples_of_k_and_plain_steps_in_between():
    data = batches(8)
    model = mlp()
    expected, expected_pattern = reference_run(
        copy.deepcopy(model), data, lambda t, g: "sam" if t % 3 == 0 else "plain"
    )
    pattern = run(model, sam_optimizer(model, EveryKSAM(k=3)), data)
    assert pattern == expected_pattern == [2, 1, 1, 2, 1, 1, 2, 1]
    assert_weights(model, expected)


def test_every_k_through_step_with_closure_matches_sam_step():
    data = batches(7)
    a, b = mlp(), mlp()
    pa = run(a, sam_optimizer(a, EveryKSAM(k=2)), data)
    pb = run_with_closure(b, sam_optimizer(b, EveryKSAM(k=2)), data)
    assert pa == pb == [2, 1, 2, 1, 2, 1, 2]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("m", [None, 8])
def test_every_k_with_k_1_is_full_sam_bit_for_bit(m):
    data = batches(4)
    a, b, c = mlp(bn=True), mlp(bn=True), mlp(bn=True)
    passes = 2 if m is None else 2 * 24 // m  # grouped steps take two forwards per group
    assert run(a, sam_optimizer(a), data, m=m) == [passes] * 4
    assert run(b, sam_optimizer(b), data, variant={"sam_variant": "every_k", "sam_k": 1}, m=m) == [passes] * 4
    assert run(c, sam_optimizer(c, FullSAM()), data, m=m) == [passes] * 4
    for x, y, z in zip(a.state_dict().values(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_every_k_with_k_1_through_closure_is_full_sam_bit_for_bit():
    data = batches(3)
    a, b = mlp(bn=True), mlp(bn=True)
    run_with_closure(a, sam_optimizer(a), data)
    run_with_closure(b, sam_optimizer(b, EveryKSAM(k=1)), data)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


# -- rst ----------------------------------------------------------------------------------------


def test_rst_draws_one_seeded_uniform_per_step_and_takes_sam_below_p():
    data = batches(12)
    model = mlp()
    draws = torch.Generator().manual_seed(123)
    u = [float(torch.rand((), generator=draws)) for _ in range(12)]
    expected, expected_pattern = reference_run(
        copy.deepcopy(model), data, lambda t, g: "sam" if u[t] < 0.4 else "plain"
    )
    pattern = run(model, sam_optimizer(model, RandomizedSAM(p=0.4, seed=123)), data)
    assert pattern == expected_pattern
    assert 1 in pattern and 2 in pattern
    assert_weights(model, expected)


def test_rst_frequency_matches_p_and_seeds_give_reproducible_streams():
    def plans(variant, steps):
        out = []
        for _ in range(steps):
            out.append(variant.plan() == "sam")
            variant.finish(out[-1])
        return out

    n, p = 4000, 0.3
    a = plans(RandomizedSAM(p=p, seed=7), n)
    assert a == plans(RandomizedSAM(p=p, seed=7), n)
    assert a != plans(RandomizedSAM(p=p, seed=8), n)
    # Binomial(n, p): 4 standard deviations.
    assert abs(sum(a) - n * p) < 4 * math.sqrt(n * p * (1 - p))
    assert plans(RandomizedSAM(p=0.0, seed=1), 200) == [False] * 200
    assert plans(RandomizedSAM(p=1.0, seed=1), 200) == [True] * 200


def test_rst_linear_schedule_moves_p_from_start_to_end():
    n = 4000
    v = RandomizedSAM(p=1.0, schedule="linear", p_start=0.0, total_steps=n, seed=3)
    assert [v.probability(t) for t in (0, n // 4, n // 2, n, 2 * n)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    taken = []
    for _ in range(n):
        taken.append(v.plan() == "sam")
        v.finish(taken[-1])
    draws = torch.Generator().manual_seed(3)
    assert taken == [float(torch.rand((), generator=draws)) < t / n for t in range(n)]
    quarter = n // 4
    # Mean of p_t over the first quarter is 0.125, over the last 0.875 (4 sd bounds at p(1-p)<=1/4).
    bound = 4 * math.sqrt(quarter / 4)
    assert abs(sum(taken[:quarter]) - 0.125 * quarter) < bound
    assert abs(sum(taken[-quarter:]) - 0.875 * quarter) < bound


def test_rst_from_config_uses_the_documented_seed_and_keys():
    v = variant_from_config({"sam_variant": "rst", "sam_p": 0.25, "seed": 4, "looksam_alpha": 9.0})
    assert v.settings() == {
        "p": 0.25,
        "schedule": "constant",
        "p_start": 0.0,
        "total_steps": None,
        "seed": 4 * 1000 + 606,
    }
    w = variant_from_config(
        {"sam_variant": "rst", "rst_schedule": "linear", "rst_p_start": 0.1, "sam_seed": 11}, total_steps=50
    )
    assert w.settings() == {"p": 0.5, "schedule": "linear", "p_start": 0.1, "total_steps": 50, "seed": 11}


# -- LookSAM ------------------------------------------------------------------------------------


def test_looksam_store_and_reuse_in_closed_form():
    v = LookSAM(k=3, alpha=0.5)
    # g = (3, 0), g_s = (1, 1): the part of g_s along g is (1, 0), so g_v = (0, 1).
    v.store([torch.tensor([3.0, 0.0]), None], [torch.tensor([1.0, 1.0]), torch.tensor([2.0])])
    torch.testing.assert_close(v.direction[0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(v.direction[1], torch.tensor([2.0]))  # no g: all of g_s is orthogonal
    g = [torch.tensor([0.0, 4.0]), torch.tensor([3.0])]
    v.reuse(g)
    # ||g|| = 5, ||g_v|| = sqrt(5): g + 0.5 * 5 / sqrt(5) * g_v.
    scale = 0.5 * 5 / math.sqrt(5)
    torch.testing.assert_close(g[0], torch.tensor([0.0, 4.0 + scale]))
    torch.testing.assert_close(g[1], torch.tensor([3.0 + 2.0 * scale]))


class LookSAMRule:
    """LookSAM, Algorithm 1 of Liu et al. (2022), on lists of tensors."""

    def __init__(self, k, alpha):
        self.k, self.alpha, self.g_v = k, alpha, None

    def __call__(self, t, g):
        if t % self.k == 0:
            return "sam"
        g_norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        v_norm = torch.sqrt(sum((vi**2).sum() for vi in self.g_v))
        return [gi + self.alpha * g_norm / v_norm * vi for gi, vi in zip(g, self.g_v)]

    def after_sam(self, g, g_s):
        dot = sum((a * b).sum() for a, b in zip(g, g_s))
        sq = sum((a * a).sum() for a in g)
        self.g_v = [b - dot / sq * a for a, b in zip(g, g_s)]


@pytest.mark.parametrize("closure", [False, True])
def test_looksam_reused_gradient_equals_its_formula(closure):
    data = batches(8)
    model = mlp()
    expected, expected_pattern = reference_run(copy.deepcopy(model), data, LookSAMRule(k=3, alpha=0.6))
    opt = sam_optimizer(model, LookSAM(k=3, alpha=0.6))
    pattern = run_with_closure(model, opt, data) if closure else run(model, opt, data)
    assert pattern == expected_pattern == [2, 1, 1, 2, 1, 1, 2, 1]
    assert_weights(model, expected)


def test_looksam_keeps_its_previous_direction_when_the_new_one_is_not_finite():
    v = LookSAM(k=3, alpha=0.5)
    v.store([torch.tensor([3.0, 0.0])], [torch.tensor([1.0, 1.0])])  # g_v = (0, 1), as above
    for g, g_s in [
        ([3.0, 0.0], [float("inf"), 1.0]),
        ([float("nan"), 0.0], [1.0, 1.0]),
        ([0.0, 0.0], [1.0, float("inf")]),
    ]:
        v.store([torch.tensor(g)], [torch.tensor(g_s)])
        assert torch.equal(v.direction[0], torch.tensor([0.0, 1.0])), (g, g_s)
    fresh = LookSAM(k=3)
    fresh.store([torch.tensor([1.0])], [torch.tensor([float("nan")])])
    assert fresh.direction is None and fresh.plan() == "sam"  # nothing to reuse yet


def test_looksam_overflowing_sam_step_is_skipped_and_the_old_direction_reused():
    data = batches(6)
    x, y = data[3]
    x = x.clone()
    x[0, 0] = float("inf")  # step 3 (a SAM step) gets nan gradients, as an fp16 overflow would
    data[3] = (x, y)
    model = mlp()

    class WithoutStep3(LookSAMRule):
        def __call__(self, t, g):
            return super().__call__(t if t < 3 else t + 1, g)

    # GradScaler skips step 3; steps 4 and 5 reuse g_v from step 0.
    expected, pattern = reference_run(copy.deepcopy(model), data[:3] + data[4:], WithoutStep3(k=3, alpha=0.6))
    assert pattern == [2, 1, 1, 1, 1]
    opt = sam_optimizer(model, LookSAM(k=3, alpha=0.6))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for xb, yb in data:
        sam_step(model, F.cross_entropy, xb, yb, opt, scaler=scaler)
    assert scaler.get_scale() == 2.0**9  # exactly one skipped step
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-7, atol=1e-9)


def test_looksam_with_alpha_0_reuses_nothing():
    data = batches(4)
    model = mlp()
    expected, _ = reference_run(copy.deepcopy(model), data, lambda t, g: "sam" if t % 2 == 0 else "plain")
    run(model, sam_optimizer(model, LookSAM(k=2, alpha=0.0)), data)
    assert_weights(model, expected)


# -- AE-SAM -------------------------------------------------------------------------------------


class AESAMRule:
    """AE-SAM, Algorithm 1 of Jiang et al. (2023): SAM iff ||g||^2 >= mu_t + c_t sigma_t."""

    def __init__(self, lambda1, lambda2, delta, total):
        self.l1, self.l2, self.delta, self.total = lambda1, lambda2, delta, total
        self.mu = self.var = 0.0

    def __call__(self, t, g):
        s = float(sum((gi**2).sum() for gi in g))
        self.mu = self.delta * self.mu + (1 - self.delta) * s
        self.var = self.delta * self.var + (1 - self.delta) * (s - self.mu) ** 2
        c = t / self.total * self.l1 + (1 - t / self.total) * self.l2
        return "sam" if s >= self.mu + c * math.sqrt(self.var) else "plain"


@pytest.mark.parametrize("closure", [False, True])
def test_ae_sam_triggers_on_the_squared_gradient_norm_against_running_mean_and_variance(closure):
    data = batches(16)
    model = mlp()
    rule = AESAMRule(lambda1=-0.5, lambda2=0.5, delta=0.7, total=16)
    expected, expected_pattern = reference_run(copy.deepcopy(model), data, rule)
    opt = sam_optimizer(model, AESAM(lambda1=-0.5, lambda2=0.5, delta=0.7, total_steps=16))
    pattern = run_with_closure(model, opt, data) if closure else run(model, opt, data)
    assert pattern == expected_pattern
    assert 1 in pattern and 2 in pattern  # the data make both outcomes happen
    assert_weights(model, expected)
    assert opt.variant.mean == pytest.approx(rule.mu, rel=1e-9)
    assert opt.variant.var == pytest.approx(rule.var, rel=1e-9)


def test_ae_sam_threshold_schedule_and_non_finite_norms():
    v = AESAM(lambda1=-1.0, lambda2=1.0, delta=0.5, total_steps=4)
    assert [v.threshold_factor(t) for t in (0, 1, 2, 4, 8)] == [1.0, 0.5, 0.0, -1.0, -1.0]
    # t=0, s=4: mu = 2, var = 0.5 * (4 - 2)^2 = 2; 4 >= 2 + 1 * sqrt(2) -> SAM.
    assert v.decide(4.0) is True and (v.mean, v.var) == (2.0, 2.0)
    v.finish(True)
    # t=1, s=2: mu = 2, var = 1; c = 0.5: 2 < 2.5 -> plain.
    assert v.decide(2.0) is False and (v.mean, v.var) == (2.0, 1.0)
    v.finish(False)
    assert v.decide(float("inf")) is False and (v.mean, v.var) == (2.0, 1.0)  # statistics untouched
    assert v.steps == 2 and v.sam_steps == 1 and v.passes == 3


def test_ae_sam_with_a_grad_scaler_decides_on_the_unscaled_norm():
    data = batches(10)
    a, b = mlp(), mlp()
    make = lambda: AESAM(lambda1=0.0, lambda2=0.0, delta=0.7)  # noqa: E731
    oa, ob = sam_optimizer(a, make()), sam_optimizer(b, make())
    pa = run(a, oa, data)
    counter, pb = PassCounter(b), []
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for x, y in data:
        before = counter.count
        sam_step(b, F.cross_entropy, x, y, ob, scaler=scaler)
        pb.append(counter.count - before)
    assert pa == pb and 1 in pa and 2 in pa
    assert oa.variant.mean == pytest.approx(ob.variant.mean, rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


# -- state survives checkpoints -----------------------------------------------------------------


VARIANT_CONFIGS = [
    {"sam_variant": "every_k", "sam_k": 3},
    {"sam_variant": "rst", "sam_p": 0.5, "rst_schedule": "linear", "sam_total_steps": 12, "seed": 2},
    {"sam_variant": "looksam", "sam_k": 4, "looksam_alpha": 0.5},
    {"sam_variant": "ae_sam", "ae_sam_delta": 0.7, "sam_total_steps": 12},
]


@pytest.mark.parametrize("config", VARIANT_CONFIGS, ids=lambda c: c["sam_variant"])
@pytest.mark.parametrize("attach", ["constructor", "sam_step"])
def test_a_resumed_run_continues_the_same_schedule(config, attach, tmp_path):
    data = batches(12)
    model = mlp(bn=True)
    opt = sam_optimizer(model, variant_from_config(config))
    first = run(model, opt, data[:5])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest = run(model, opt, data[5:])

    resumed = mlp(seed=9, bn=True)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    if attach == "constructor":
        opt2 = sam_optimizer(resumed, variant_from_config(config))
        opt2.load_state_dict(state["opt"])
        resumed_rest = run(resumed, opt2, data[5:])
    else:  # a trainer that restores the optimizer first and passes the config to every step
        opt2 = sam_optimizer(resumed)
        opt2.load_state_dict(state["opt"])
        resumed_rest = run(resumed, opt2, data[5:], variant=config)
    assert resumed_rest == rest
    assert opt2.variant.steps == 12 and opt2.variant.passes == sum(first) + sum(rest)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_resuming_with_another_variant_or_none_is_refused(tmp_path):
    data = batches(3)
    model = mlp()
    opt = sam_optimizer(model, LookSAM(k=2))
    run(model, opt, data)
    state = opt.state_dict()
    other = sam_optimizer(mlp(), EveryKSAM(k=2))
    with pytest.raises(ValueError, match="checkpoint's SAM variant 'looksam'"):
        other.load_state_dict(state)
    knobs = sam_optimizer(mlp(), LookSAM(k=3))
    with pytest.raises(ValueError, match="differs from this run's 'looksam'"):
        knobs.load_state_dict(state)
    plain = mlp()
    unattached = sam_optimizer(plain)
    unattached.load_state_dict(state)
    with pytest.raises(ValueError, match="checkpoint follows sam_variant='looksam'"):
        sam_step(plain, F.cross_entropy, *data[0], unattached)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sam_variant": "lookSAM"}, r"sam_variant='lookSAM' is not one of \('full', 'every_k', 'rst'"),
        ({"sam_variant": "every_k", "sam_k": 0}, r"sam_k must be an integer >= 1, got 0"),
        ({"sam_variant": "looksam", "sam_k": 2.5}, r"sam_k must be an integer >= 1, got 2.5"),
        ({"sam_variant": "rst", "sam_p": 1.5}, r"sam_p must be a probability in \[0, 1\], got 1.5"),
        ({"sam_variant": "rst", "rst_schedule": "cosine"}, r"rst_schedule='cosine' is not one of"),
        ({"sam_variant": "rst", "rst_schedule": "linear"}, r"linear.*sam_total_steps"),
        ({"sam_variant": "looksam", "looksam_alpha": -0.1}, r"looksam_alpha must be a number >= 0"),
        ({"sam_variant": "ae_sam", "ae_sam_delta": 1.0, "sam_total_steps": 9}, r"ae_sam_delta must be in \(0, 1\)"),
        ({"sam_variant": "ae_sam"}, r"ae_sam_lambda2 to ae_sam_lambda1.*sam_total_steps"),
        ({"sam_variant": "ae_sam", "sam_total_steps": 0}, r"sam_total_steps must be an integer >= 1, got 0"),
    ],
)
def test_bad_variant_settings_raise_a_clear_error(config, message):
    with pytest.raises(ValueError, match=message):
        variant_from_config(config)


def test_make_variant_names_an_unknown_knob():
    with pytest.raises(ValueError, match=r"sam_variant='every_k' does not take \['alpha'\]"):
        make_variant("every_k", alpha=0.1)


@pytest.mark.parametrize("name", ["looksam", "ae_sam"])
def test_whole_batch_variants_refuse_m_sharpness_groups(name):
    model = mlp()
    x, y = batches(1)[0]
    opt = sam_optimizer(model, variant_from_config({"sam_variant": name, "sam_total_steps": 5}))
    with pytest.raises(ValueError, match=rf"sam_variant='{name}' decides from the whole local batch.*m=8"):
        sam_step(model, F.cross_entropy, x, y, opt, m=8)
    assert opt.variant.steps == 0


def test_every_k_and_rst_combine_with_m_sharpness_groups():
    model = mlp()
    data = batches(4)
    opt = sam_optimizer(model, EveryKSAM(k=2))
    # 3 groups of 8: a SAM step is 3 x 2 forwards, a plain step one.
    assert run(model, opt, data, m=8) == [6, 1, 6, 1]


def test_a_variant_needs_a_sam_optimizer_and_full_is_a_plain_step_there():
    model = mlp()
    x, y = batches(1)[0]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"sam_variant='rst' .* needs a SAM optimizer.*got SGD"):
        sam_step(model, F.cross_entropy, x, y, sgd, variant="rst")
    counter = PassCounter(model)
    sam_step(model, F.cross_entropy, x, y, sgd, variant={"sam_variant": "full"})
    assert counter.count == 1


def test_one_optimizer_keeps_one_variant():
    model = mlp()
    x, y = batches(1)[0]
    opt = sam_optimizer(model)
    sam_step(model, F.cross_entropy, x, y, opt, variant={"sam_variant": "every_k", "sam_k": 2})
    attached = opt.variant
    sam_step(model, F.cross_entropy, x, y, opt, variant={"sam_variant": "every_k", "sam_k": 2})
    assert opt.variant is attached and attached.steps == 2
    with pytest.raises(ValueError, match=r"already follows EveryKSAM\(k=2\)"):
        sam_step(model, F.cross_entropy, x, y, opt, variant={"sam_variant": "every_k", "sam_k": 3})
    with pytest.raises(ValueError, match="variant must be a SAMVariant"):
        sam_step(model, F.cross_entropy, x, y, opt, variant=3)


# -- data-parallel workers decide alike ---------------------------------------------------------


DDP_CONFIGS = [
    {"sam_variant": "looksam", "sam_k": 3},
    {"sam_variant": "ae_sam", "ae_sam_lambda1": 0.0, "ae_sam_lambda2": 0.0, "ae_sam_delta": 0.7},
    {"sam_variant": "rst", "sam_p": 0.5},
]


def _ddp_worker(rank, world, init_file, out_dir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    # A short timeout: workers that disagree on a second pass fail instead of hanging.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.save([_ddp_run(rank, config) for config in DDP_CONFIGS], f"{out_dir}/rank{rank}.pt")
    finally:
        # No DDP module may outlive its process group: one still alive here keeps gloo's
        # threads and their pending work until interpreter teardown, which can abort the
        # process (SIGABRT, "terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def _ddp_run(rank, config):
    model = nn.parallel.DistributedDataParallel(mlp(bn=True))
    opt = SAM(model.parameters(), rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    data = batches(8, seed=100 + rank)  # each worker its own shard
    pattern = run(model, opt, data, variant=config)
    return {"pattern": pattern, "weights": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.slow
def test_ddp_workers_take_the_same_steps_and_stay_identical(tmp_path):
    """Two gloo workers with different shards: LookSAM's g_v, AE-SAM's decision and RST's draws
    must agree across workers, or the replicas drift apart (or the second pass deadlocks)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for config, a, b in zip(DDP_CONFIGS, r0, r1):
        assert a["pattern"] == b["pattern"], config
        assert 1 in a["pattern"] and 2 in a["pattern"], config
        for x, y in zip(a["weights"], b["weights"]):
            assert torch.equal(x, y), config


# -- MSAM: one pass at the momentum-perturbed weights ---------------------------------------------


def grad_at(model, weights, x, y):
    """The loss gradient at `weights` (name -> tensor), by autograd on a functional call; the
    model's own parameters are not touched."""
    from torch.func import functional_call

    leaves = {k: w.detach().clone().requires_grad_(True) for k, w in weights.items()}
    loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def flat_norm(tensors):
    return math.sqrt(sum(float((t * t).sum()) for t in tensors))


def msam_sgd_by_hand(model, data, rho, lr, mu, wd):
    """MSAM with SGD written out: eps = -rho v / ||v|| (0 before the first step), the gradient
    there, then v = mu v + g + wd w and w -= lr v, from w."""
    w = {k: p.detach().clone() for k, p in model.named_parameters()}
    v = None
    for x, y in data:
        if v is None:
            point = w
        else:
            norm = flat_norm(v.values())
            point = {k: w[k] - rho * v[k] / norm for k in w}
        g = grad_at(model, point, x, y)
        d = {k: g[k] + wd * w[k] for k in w}
        v = d if v is None else {k: mu * v[k] + d[k] for k in w}
        w = {k: w[k] - lr * v[k] for k in w}
    return w


def msam_adamw_by_hand(model, data, rho, lr, betas, eps, wd):
    """MSAM with AdamW written out: eps = -rho m / ||m|| with m Adam's first moment."""
    b1, b2 = betas
    w = {k: p.detach().clone() for k, p in model.named_parameters()}
    m = s = None
    for t, (x, y) in enumerate(data, start=1):
        point = w if m is None else {k: w[k] - rho * m[k] / flat_norm(m.values()) for k in w}
        g = grad_at(model, point, x, y)
        m = {k: (1 - b1) * g[k] + (0 if m is None else b1 * m[k]) for k in w}
        s = {k: (1 - b2) * g[k] ** 2 + (0 if s is None else b2 * s[k]) for k in w}
        w = {k: w[k] * (1 - lr * wd) - lr / (1 - b1**t) * m[k] / ((s[k] / (1 - b2**t)).sqrt() + eps) for k in w}
    return w


def assert_close_weights(model, expected, tol=1e-10):
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach(), expected[k], atol=tol, rtol=0), k


def test_msam_with_sgd_equals_its_update_by_hand_from_the_first_step():
    data = batches(5)
    model = mlp()
    expected = msam_sgd_by_hand(copy.deepcopy(model), data, RHO, LR, MOMENTUM, WD)
    opt = sam_optimizer(model, "msam")
    assert run(model, opt, data) == [1] * 5  # one pass per step
    assert opt.variant.passes == 5 and opt.variant.sam_steps == 0
    assert_close_weights(model, expected)


def test_msam_first_step_is_the_plain_sgd_step():
    ((x, y),) = batches(1)
    model, plain = mlp(), mlp()
    sam_step(model, F.cross_entropy, x, y, sam_optimizer(model, "msam"))
    sgd = torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    F.cross_entropy(plain(x), y).backward()
    sgd.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_msam_with_adamw_equals_its_update_by_hand():
    data = batches(5)
    model = mlp()
    betas, eps, lr, wd = (0.9, 0.999), 1e-8, 0.01, 0.05
    expected = msam_adamw_by_hand(copy.deepcopy(model), data, RHO, lr, betas, eps, wd)
    opt = SAM(
        model.parameters(), torch.optim.AdamW, rho=RHO, lr=lr, betas=betas, eps=eps, weight_decay=wd, variant="msam"
    )
    run(model, opt, data)
    assert_close_weights(model, expected)


def test_msam_through_step_with_closure_matches_sam_step():
    data = batches(4)
    a, b = mlp(), mlp()
    run(a, sam_optimizer(a, "msam"), data)
    opt = sam_optimizer(b, "msam")
    for x, y in data:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(b(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_msam_with_rho_0_is_the_base_optimizer_bit_for_bit():
    data = batches(5)
    model, plain = mlp(bn=True), mlp(bn=True)
    run(model, sam_optimizer(model, "msam", rho=0.0), data)
    sgd = torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in data:
        sgd.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        sgd.step()
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_msam_leaves_the_weights_at_w_between_steps():
    """The perturbation lives inside the step: after it the weights are w_{t+1} exactly."""
    data = batches(3)
    model = mlp()
    opt = sam_optimizer(model, "msam")
    run(model, opt, data[:2])
    w = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    run(model, opt, data[2:])
    # w_{t+1} = w_t - lr v_{t+1} with v_{t+1} the buffer the step left.
    for p, before, old in zip(model.parameters(), w, buffers):
        new = opt.base_optimizer.state[p]["momentum_buffer"]
        assert not torch.equal(new, old)
        assert torch.allclose(p.detach(), before - LR * new, atol=1e-14, rtol=0)


def test_msam_resumed_from_a_checkpoint_takes_the_same_next_update(tmp_path):
    data = batches(6)
    model = mlp(bn=True)
    opt = sam_optimizer(model, "msam")
    run(model, opt, data[:3])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    run(model, opt, data[3:])
    resumed = mlp(seed=5, bn=True)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    opt2 = sam_optimizer(resumed)
    opt2.load_state_dict(state["opt"])
    run(resumed, opt2, data[3:], variant={"sam_variant": "msam"})
    assert opt2.variant.steps == 6
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_msam_refuses_m_sharpness_groups_and_asam():
    model = mlp()
    ((x, y),) = batches(1)
    with pytest.raises(ValueError, match=r"sam_variant='msam' takes one perturbation per step.*m=8"):
        sam_step(model, F.cross_entropy, x, y, sam_optimizer(model, "msam"), m=8)
    opt = sam_optimizer(model, "msam", adaptive=True)
    with pytest.raises(ValueError, match="ASAM's adaptive scaling is not defined"):
        sam_step(model, F.cross_entropy, x, y, opt)

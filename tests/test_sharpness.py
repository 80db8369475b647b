"""Sharpness measures against closed forms (a quadratic loss) and dense Hessians (small networks)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samtune.contract.keys import DEFAULT_MEASURES
from samtune.sharpness.budget import skipped_note
from samtune.sharpness.curvature import (
    ggn_top_eig,
    ggn_trace,
    hessian_top_eig,
    hessian_trace,
    pac_bayes_sigma,
    top_eig_estimate,
    trace_estimate,
)
from samtune.sharpness.density import spectral_density
from samtune.sharpness.ggn import GGN
from samtune.sharpness.hvp import HVP, FlatLoss, measuring
from samtune.sharpness.measures import MEASURES, measure_sharpness
from samtune.sharpness.worst_case import (
    adaptive_sharpness,
    avg_sharpness,
    avg_sharpness_estimate,
    m_sharpness,
)


@pytest.fixture(autouse=True)
def float64():
    """Closed-form comparisons in double precision; restored for the other test files."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w, whatever the input: Hessian A, gradient A w."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.register_buffer("a", a)

    def forward(self, x):
        return self.w.expand(len(x), -1)


def quad_loss(a):
    def loss(out, y):
        w = out[0]
        return 0.5 * w @ a @ w

    return loss


def spd(n, seed=0, spread=10.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    eig = torch.linspace(0.1, spread, n)
    return q @ torch.diag(eig) @ q.T


@pytest.fixture
def quad():
    a = spd(12)
    w = torch.randn(12, generator=torch.Generator().manual_seed(1))
    model = Quadratic(a, w)
    x, y = torch.zeros(8, 1), torch.zeros(8, dtype=torch.long)
    return model, quad_loss(a), x, y, a, w


def values(logged):
    """What a measurement logged, less the seconds it took (the one figure a rerun changes)."""
    return {k: v for k, v in logged.items() if not k.endswith("/seconds")}


def exact_ball_max(a, w, rho):
    """max_{|e| <= rho} e^T A w + 0.5 e^T A e, via the trust-region secular equation."""
    evals, evecs = torch.linalg.eigh(a)
    b = evecs.T @ (a @ w)
    lo, hi = float(evals[-1]) + 1e-12, float(evals[-1]) + 1e6
    for _ in range(200):
        lam = 0.5 * (lo + hi)
        norm = torch.sqrt(((b / (lam - evals)) ** 2).sum())
        lo, hi = (lam, hi) if norm > rho else (lo, lam)
    e = evecs @ (b / (lam - evals))
    return float(e @ a @ w + 0.5 * e @ a @ e)


def test_top_eigenvalues_match_eigvalsh(quad):
    model, loss, x, y, a, _ = quad
    top = hessian_top_eig(model, loss, x, y, k=3, iters=12)
    ref = torch.linalg.eigvalsh(a).flip(0)[:3]
    assert np.allclose(top, ref.tolist(), atol=1e-4)


def test_trace_hutchpp_is_exact_when_the_sketch_covers_the_space(quad):
    model, loss, x, y, a, _ = quad
    assert hessian_trace(model, loss, x, y, probes=36) == pytest.approx(float(a.trace()), abs=1e-4)


def test_trace_hutchinson_is_unbiased():
    a = spd(40, seed=3)
    model = Quadratic(a, torch.zeros(40))
    x, y = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
    est = hessian_trace(model, quad_loss(a), x, y, probes=4000, method="hutchinson", probe_batch=500)
    # Rademacher variance is 2 * sum_{i!=j} A_ij^2; the estimate must sit within 4 standard errors.
    off = a - torch.diag(torch.diag(a))
    se = math.sqrt(2 * float((off**2).sum()) / 4000)
    assert abs(est - float(a.trace())) < 4 * se


def test_one_step_m_sharpness_is_rho_grad_norm_plus_second_order(quad):
    model, loss, x, y, a, w = quad
    g = a @ w
    for rho in (1e-2, 1e-3):
        value = m_sharpness(model, loss, x, y, rho=rho, m=8, steps=1)
        # L(w + rho g/|g|) - L(w) = rho |g| + 0.5 rho^2 g^T A g / |g|^2 exactly for a quadratic.
        exact = rho * g.norm() + 0.5 * rho**2 * (g @ a @ g) / (g @ g)
        assert value == pytest.approx(float(exact), rel=1e-9)
        assert abs(value - rho * float(g.norm())) <= rho**2 * float(torch.linalg.eigvalsh(a)[-1])


def test_more_ascent_steps_reach_the_exact_ball_maximum(quad):
    model, loss, x, y, a, w = quad
    rho = 0.5
    exact = exact_ball_max(a, w, rho)
    one = m_sharpness(model, loss, x, y, rho=rho, m=8, steps=1)
    many = m_sharpness(model, loss, x, y, rho=rho, m=8, steps=40)
    assert one <= exact + 1e-9 and many <= exact + 1e-9
    assert exact - many < 0.25 * (exact - one)
    assert many == pytest.approx(exact, rel=2e-2)


def test_adaptive_one_step_follows_the_scaled_ball(quad):
    model, loss, x, y, a, w = quad
    rho = 1e-2
    t = w.abs()
    g = a @ w
    eps = rho * t * t * g / (t * g).norm()
    exact = float(eps @ a @ w + 0.5 * eps @ a @ eps)
    assert adaptive_sharpness(model, loss, x, y, rho=rho, m=8) == pytest.approx(exact, rel=1e-9)
    # L-infinity ball scaled by |w|: one signed step to its corner.
    eps = rho * t * torch.sign(g)
    exact = float(eps @ a @ w + 0.5 * eps @ a @ eps)
    assert adaptive_sharpness(model, loss, x, y, rho=rho, m=8, norm="linf") == pytest.approx(exact, rel=1e-9)


def test_average_sharpness_is_half_sigma_squared_trace(quad):
    model, loss, x, y, a, _ = quad
    sigma = 0.05
    est = avg_sharpness(model, loss, x, y, sigma=sigma, samples=4000)
    assert est == pytest.approx(0.5 * sigma**2 * float(a.trace()), rel=0.1)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def dense_hessian(model, x, y):
    """The full Hessian of the train-mode (batch-statistics) loss, with torch.autograd."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sizes = [s.numel() for s in shapes]

    def f(v):
        params = {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes)}
        out = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(out, y)

    bn = model[1]
    saved = bn.running_mean.clone(), bn.running_var.clone()
    h = torch.autograd.functional.hessian(f, flat)
    bn.running_mean.copy_(saved[0]), bn.running_var.copy_(saved[1])
    return h


def test_network_hessian_eigenvalues_and_trace_match_a_dense_hessian():
    model = small_net()
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(3))
    h = dense_hessian(model, x, y)
    n = h.shape[0]
    ref = torch.linalg.eigvalsh(h).flip(0)
    top = hessian_top_eig(model, F.cross_entropy, x, y, k=2, iters=n, batch=32)
    assert np.allclose(top, ref[:2].tolist(), rtol=1e-6, atol=1e-8)
    trace = hessian_trace(model, F.cross_entropy, x, y, probes=3 * n, batch=32)
    assert trace == pytest.approx(float(h.trace()), rel=1e-6)


def test_per_block_filter_measures_only_that_block():
    model = small_net()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(5))
    h = dense_hessian(model, x, y)
    # Parameters are laid out in named_parameters order; the last Linear ("3.") comes last.
    last = sum(p.numel() for p in model[3].parameters())
    block = h[-last:, -last:]
    top = hessian_top_eig(model, F.cross_entropy, x, y, k=1, iters=last, params=["3"], batch=16)
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-6)
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        hessian_top_eig(model, F.cross_entropy, x, y, params=["nope"])


def test_measuring_leaves_the_model_exactly_as_found():
    torch.set_default_dtype(torch.float32)
    model = small_net()
    model.eval()
    x = torch.randn(64, 5, dtype=torch.float32)
    y = torch.randint(0, 3, (64,))
    model(x)  # eval: no stat update
    model.train()
    model(x)  # put something in the running stats
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = measure_sharpness(
        model,
        F.cross_entropy,
        x,
        y,
        seed=1,
        measures=[
            "m_sharpness",
            "adaptive_sharpness",
            "adaptive_sharpness_linf",
            "avg_sharpness",
            "hessian_top_eig",
            "hessian_trace",
            "pac_bayes_sigma",
        ],
        m_sharpness={"m": 32, "steps": 3},
    )
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert out["sharpness/m_sharpness/m"] == 32 and out["sharpness/m_sharpness/steps"] == 3
    assert out["sharpness/subset"] == 64
    for name in (
        "m_sharpness",
        "adaptive_sharpness",
        "avg_sharpness",
        "hessian_top_eig",
        "hessian_trace",
        "pac_bayes_sigma",
    ):
        assert math.isfinite(out[f"sharpness/{name}"])
    assert out["sharpness/m_sharpness"] >= 0 and out["sharpness/hessian_top_eig"] > 0


def test_pac_bayes_sigma_is_smaller_for_a_sharper_network():
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = (x[:, 0] > 0).long()
    flat = nn.Sequential(nn.Linear(5, 2))
    with torch.no_grad():
        flat[0].weight.zero_()
        flat[0].weight[1, 0] = 1.0
        flat[0].bias.zero_()
    sharp = nn.Sequential(nn.Linear(5, 2))
    with torch.no_grad():
        sharp[0].weight.copy_(flat[0].weight * 0.01)
        sharp[0].bias.zero_()
    s_flat = pac_bayes_sigma(flat, F.cross_entropy, x, y, samples=16)
    s_sharp = pac_bayes_sigma(sharp, F.cross_entropy, x, y, samples=16)
    # Same classifier, 100x smaller weights: the same relative noise needs a 100x smaller sigma.
    assert s_sharp < s_flat / 20


def test_bad_settings_are_named():
    model = small_net()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="unknown sharpness measure 'sharpnes'"):
        measure_sharpness(model, F.cross_entropy, x, y, measures=["sharpnes"])
    with pytest.raises(ValueError, match="unknown setting"):
        measure_sharpness(model, F.cross_entropy, x, y, measures=["m_sharpness"], m_sharpness={"rh": 1})
    with pytest.raises(ValueError, match="rho >= 0"):
        m_sharpness(model, F.cross_entropy, x, y, rho=-1.0)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_both_hvp_modes_agree_with_the_dense_hessian(mode):
    model = small_net()
    x = torch.randn(24, 5, generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(7))
    h = dense_hessian(model, x, y)
    n = h.shape[0]
    trace = hessian_trace(model, F.cross_entropy, x, y, probes=3 * n, batch=24, mode=mode)
    assert trace == pytest.approx(float(h.trace()), rel=1e-6)


@pytest.mark.parametrize("mode", ["graph", "forward", "reverse", "auto"])
def test_hessian_vector_products_equal_the_dense_hessian_times_v(mode):
    model = small_net()
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(8))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(9))
    # Chunks of 8, 8 and 4 examples, each with its own BatchNorm statistics: the function is the
    # size-weighted mean of the chunk losses, so the reference is that mean of dense Hessians.
    parts = [slice(0, 8), slice(8, 16), slice(16, 20)]
    h = sum((p.stop - p.start) / 20 * dense_hessian(model, x[p], y[p]) for p in parts)
    vs = torch.randn(7, h.shape[0], generator=torch.Generator().manual_seed(10))
    with measuring(model):
        # Probe blocks of 3, 3 and 1: the batched path and the single-probe path both run.
        hvp = HVP(FlatLoss(model, F.cross_entropy), x, y, batch=8, mode=mode, probe_batch=3)
        out = hvp(vs)
    # The engine asked for is the one that ran (no silent fallback), "auto" picking the graph.
    assert hvp.mode == ("graph" if mode == "auto" else mode)
    torch.testing.assert_close(out, vs @ h, rtol=1e-9, atol=1e-11)


def test_auto_keeps_graphs_only_within_this_process_share_of_free_memory(monkeypatch):
    """'auto' keeps the graphs when they fit in half of memory_share x the free memory: with the
    free memory fixed just above what the graphs need, a share of a half sends it to forward mode."""
    import samtune.sharpness.hvp as sharpness

    model = small_net()
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(8))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(9))
    totals = []

    class Recording(sharpness.SavedBytes):
        @property
        def total(self):
            totals.append(super().total)
            return totals[-1]

    monkeypatch.setattr(sharpness, "SavedBytes", Recording)
    with measuring(model):
        f = FlatLoss(model, F.cross_entropy)
        assert HVP(f, x, y, batch=8, mode="auto").mode == "graph"  # this machine's real memory
        # What auto needs: the kept graphs of 3 chunks plus one chunk's in flight per probe.
        need = 4 * totals[-1]
        monkeypatch.setattr(sharpness, "available_bytes", lambda device: int(2 * need * 1.2))
        kept = HVP(f, x, y, batch=8, mode="auto")
        halved = HVP(f, x, y, batch=8, mode="auto", memory_share=0.5)
        assert kept.mode == "graph" and halved.mode == "forward"
        with pytest.raises(ValueError, match="memory_share"):
            HVP(f, x, y, batch=8, mode="auto", memory_share=0.0)
    # The setting is accepted from measure_sharpness, is not logged, and changes the value only by
    # rounding (the free memory is still the patched one: the half share runs forward mode).
    common = dict(measures=["hessian_top_eig"], batch=8)
    whole = values(measure_sharpness(model, F.cross_entropy, x, y, **common))
    half = values(measure_sharpness(model, F.cross_entropy, x, y, hessian_top_eig={"memory_share": 0.5}, **common))
    assert whole.keys() == half.keys()
    assert half == pytest.approx(whole, rel=1e-9)


def test_hutchpp_with_fewer_probes_than_3n_is_unbiased():
    # 10 probes on a 30-dimensional quadratic: a sketch of 3, far from spanning the space, so the
    # projected Hutchinson remainder carries most of the trace.
    n, runs = 30, 300
    a = spd(n, seed=5)
    model = Quadratic(a, torch.zeros(n))
    x, y = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
    estimates = np.array([hessian_trace(model, quad_loss(a), x, y, probes=10, seed=s) for s in range(runs)])
    se = estimates.std(ddof=1) / math.sqrt(runs)
    assert abs(estimates.mean() - float(a.trace())) < 4 * se
    # The estimates do vary: the branch under test ran, not the exact sketch-covers-all one.
    assert estimates.std() > 1e-3 * float(a.trace())


def tiny_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def one_step_rise(model, x, y, rho):
    """SAM's one-step estimate on one batch by hand: L(w + rho g/|g|) - L(w) on a copy, with
    the gradient from loss.backward() (floored at 0: eps = 0 is in the ball)."""
    import copy

    clone = copy.deepcopy(model)
    loss = F.cross_entropy(clone(x), y)
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in clone.parameters()))
    with torch.no_grad():
        for p in clone.parameters():
            p += rho * p.grad / norm
        rise = F.cross_entropy(clone(x), y) - loss
    return max(float(rise), 0.0), float(norm)


def test_m_sharpness_is_the_mean_one_step_rise_over_disjoint_batches():
    model = tiny_mlp()
    x = torch.randn(26, 4, generator=torch.Generator().manual_seed(11))
    y = torch.randint(0, 3, (26,), generator=torch.Generator().manual_seed(12))
    rho, m = 0.1, 8
    # Batches [0:8], [8:16], [16:24]; the last 2 examples make a partial batch, dropped.
    per_batch = [one_step_rise(model, x[i : i + m], y[i : i + m], rho) for i in (0, 8, 16)]
    expected = float(np.mean([rise for rise, _ in per_batch]))
    value = m_sharpness(model, F.cross_entropy, x, y, rho=rho, m=m)
    assert value == pytest.approx(expected, rel=1e-10)
    # To first order it is rho times the mean per-batch gradient norm.
    first_order = rho * float(np.mean([norm for _, norm in per_batch]))
    assert value == pytest.approx(first_order, rel=0.2)
    # The grouping is what is measured: one batch of all 24 examples gives another number.
    whole, _ = one_step_rise(model, x[:24], y[:24], rho)
    assert abs(whole - expected) > 0.05 * expected
    assert m_sharpness(model, F.cross_entropy, x[:24], y[:24], rho=rho, m=24) == pytest.approx(whole, rel=1e-10)


def test_adaptive_average_sharpness_is_half_sigma_squared_weighted_diagonal():
    n, sigma, samples = 12, 0.05, 4000
    a = spd(n)
    w = torch.linspace(0.1, 3.0, n) * torch.tensor([1.0, -1.0]).repeat(n // 2)
    model = Quadratic(a, w)
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    est = avg_sharpness(model, quad_loss(a), x, y, sigma=sigma, samples=samples, adaptive=True)
    # delta = sigma |w| z: E[0.5 delta^T A delta] = 0.5 sigma^2 sum_i w_i^2 A_ii. Each antithetic
    # pair gives 0.5 z^T B z exactly (B = sigma^2 |w| A |w|), of variance 0.5 tr(B^2).
    exact = 0.5 * sigma**2 * float((w**2 * torch.diag(a)).sum())
    b = sigma**2 * torch.outer(w.abs(), w.abs()) * a
    se = math.sqrt(0.5 * float((b @ b).trace()) / samples)
    assert abs(est - exact) < 4 * se
    # Not the isotropic value: the |w| scaling is what is tested.
    assert abs(0.5 * sigma**2 * float(a.trace()) - exact) > 20 * se


SEEDED = ("avg_sharpness", "hessian_top_eig", "hessian_trace", "ggn_top_eig", "ggn_trace", "pac_bayes_sigma")


def test_the_seed_decides_the_seeded_measures_and_only_those():
    model = small_net()
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(13))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(14))
    # Lanczos stopped before convergence and Hutch++ with a partial sketch: both depend on the
    # random start / probes, as the Monte Carlo measures do.
    settings = {
        "hessian_top_eig": {"iters": 4, "tol": 0.0},
        "hessian_trace": {"probes": 10},
        "ggn_top_eig": {"iters": 4, "tol": 0.0},
        "ggn_trace": {"probes": 10},
    }

    def measure(seed):
        return values(measure_sharpness(model, F.cross_entropy, x, y, measures=list(MEASURES), seed=seed, **settings))

    first, again, other = measure(1), measure(1), measure(2)
    assert first == again
    assert (first["sharpness/seed"], other["sharpness/seed"]) == (1, 2)
    for name in MEASURES:
        key = f"sharpness/{name}"
        if name in SEEDED:
            assert first[key] != other[key], name
        else:  # the worst-case ascent is deterministic
            assert first[key] == other[key], name


def test_every_setting_is_logged_with_the_value_norm_and_filter_included():
    assert "adaptive_sharpness_linf" in DEFAULT_MEASURES and "adaptive_sharpness" in DEFAULT_MEASURES
    model = small_net()
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(15))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(16))
    out = measure_sharpness(model, F.cross_entropy, x, y, params=["3"], batch=32)
    for name in DEFAULT_MEASURES:
        _, defaults, fixed = MEASURES[name]
        assert math.isfinite(out[f"sharpness/{name}"]), name
        for key, setting in {**defaults, **fixed}.items():
            logged = f"sharpness/{name}/{key}/{setting}" if isinstance(setting, str) else f"sharpness/{name}/{key}"
            assert logged in out, logged
    assert out["sharpness/adaptive_sharpness/norm/l2"] == 1.0
    assert out["sharpness/adaptive_sharpness_linf/norm/linf"] == 1.0
    assert out["sharpness/params/3"] == 1.0
    assert out["sharpness/num_params"] == sum(p.numel() for p in model[3].parameters())
    # The logged L-infinity value is the L-infinity ball's, on the filtered block.
    linf = adaptive_sharpness(model, F.cross_entropy, x, y, rho=0.002, m=32, norm="linf", params=["3"])
    assert out["sharpness/adaptive_sharpness_linf"] == linf
    assert linf != adaptive_sharpness(model, F.cross_entropy, x, y, rho=0.002, m=32, params=["3"])
    # No filter: no params key, every parameter counted.
    plain = measure_sharpness(model, F.cross_entropy, x, y, measures=[])
    assert not any(k.startswith("sharpness/params/") for k in plain)
    assert plain["sharpness/num_params"] == sum(p.numel() for p in model.parameters())


class _FixedAffine(nn.Module):
    """What a frozen-statistics BatchNorm computes, written out: a per-channel affine map of
    constant statistics (no BatchNorm type, so nothing about it can be treated as one)."""

    def __init__(self, bn):
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("mean", bn.running_mean.clone())
        self.register_buffer("scale", (bn.running_var + bn.eps).rsqrt())

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) * self.scale.view(shape) * self.weight.view(shape) + self.bias.view(shape)


def test_a_model_with_frozen_batchnorm_statistics_is_measured_as_the_function_it_trained():
    """A finetuned model with freeze_bn normalises with its running statistics, in training too:
    its sharpness is that of the same network with those statistics as constants."""
    import copy

    from samtune.models.heads import freeze_batchnorm_stats
    from samtune.models.zoo import build_model

    torch.manual_seed(0)
    model = freeze_batchnorm_stats(build_model("cnn", 10, (1, 8, 8)))
    for m in model.modules():
        if getattr(m, "frozen_stats", False):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    written_out = copy.deepcopy(model)
    for m in list(written_out.modules()):
        for child_name, child in list(m.named_children()):
            if getattr(child, "frozen_stats", False):
                setattr(m, child_name, _FixedAffine(child))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    before = [b.clone() for b in model.buffers()]
    measures = ["m_sharpness", "avg_sharpness", "hessian_trace"]
    got = measure_sharpness(model, F.cross_entropy, x, y, measures=measures, seed=3)
    ref = measure_sharpness(written_out, F.cross_entropy, x, y, measures=measures, seed=3)
    for name in measures:
        key = f"sharpness/{name}"
        assert math.isfinite(got[key]) and got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), name
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


# ------------------------------------------------------------------------------ Gauss-Newton
def dense_ggn(model, x, y):
    """J^T H_L J / N from the full Jacobian of the train-mode logits and the softmax Hessians."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(v):
        params = {n: t.view(s) for n, t, s in zip(names, v.split([s.numel() for s in shapes]), shapes)}
        return torch.func.functional_call(model, params, (x,))

    with measuring(model):
        jac = torch.autograd.functional.jacobian(logits, flat).reshape(-1, len(flat))
        p = torch.softmax(logits(flat).detach(), 1)
    h = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    return jac.T @ h @ jac / len(y)


@pytest.mark.parametrize("mode, probe_batch", [("graph", 3), ("chunk", 3), ("graph", 1), ("auto", 2)])
def test_ggn_products_equal_the_dense_gauss_newton_matrix_times_v(mode, probe_batch):
    model = small_net()
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(17))
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(18))
    # Chunks of 8, 8, 4 with their own BatchNorm statistics: the size-weighted mean of chunk GGNs.
    parts = [slice(0, 8), slice(8, 16), slice(16, 20)]
    g = sum((p.stop - p.start) / 20 * dense_ggn(model, x[p], y[p]) for p in parts)
    vs = torch.randn(7, g.shape[0], generator=torch.Generator().manual_seed(19))
    with measuring(model):
        ggn = GGN(FlatLoss(model, F.cross_entropy), x, y, batch=8, mode=mode, probe_batch=probe_batch)
        out = ggn(vs)
    assert ggn.mode == ("graph" if mode == "auto" else mode)
    torch.testing.assert_close(out, vs @ g, rtol=1e-9, atol=1e-12)
    # Positive semi-definite, unlike this network's Hessian.
    assert float(torch.linalg.eigvalsh(g)[0]) > -1e-12
    assert float(torch.linalg.eigvalsh(dense_hessian(model, x, y))[0]) < -1e-6


def test_ggn_measures_match_the_dense_ggn_and_equal_the_hessian_for_linear_logits():
    model = small_net()
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(20))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(21))
    g = dense_ggn(model, x, y)
    n = g.shape[0]
    top = ggn_top_eig(model, F.cross_entropy, x, y, k=2, iters=n, batch=32)
    assert np.allclose(top, torch.linalg.eigvalsh(g).flip(0)[:2].tolist(), rtol=1e-6, atol=1e-9)
    assert ggn_trace(model, F.cross_entropy, x, y, probes=3 * n, batch=32) == pytest.approx(float(g.trace()), rel=1e-6)
    # Logits linear in the parameters (one Linear layer): the cross-entropy's Hessian is its GGN.
    linear = tiny_mlp()[0]
    xl = torch.randn(24, 4, generator=torch.Generator().manual_seed(22))
    yl = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(23))
    common = dict(k=2, iters=25, batch=10, seed=4)
    assert np.allclose(
        ggn_top_eig(linear, F.cross_entropy, xl, yl, **common),
        hessian_top_eig(linear, F.cross_entropy, xl, yl, **common),
        rtol=1e-9,
    )
    assert ggn_trace(linear, nn.CrossEntropyLoss(), xl, yl, probes=75, batch=10) == pytest.approx(
        hessian_trace(linear, F.cross_entropy, xl, yl, probes=75, batch=10), rel=1e-9
    )


def test_ggn_measures_refuse_a_loss_that_is_not_cross_entropy(quad):
    model, loss, x, y, _, _ = quad
    with pytest.raises(ValueError, match="cross-entropy"):
        ggn_trace(model, loss, x, y)
    with pytest.raises(ValueError, match="cross-entropy"):
        measure_sharpness(
            small_net(),
            nn.CrossEntropyLoss(reduction="sum"),
            torch.randn(8, 5),
            torch.randint(0, 3, (8,)),
            measures=["ggn_top_eig"],
        )


# ------------------------------------------------------------------------------ uncertainty, cost
@pytest.mark.parametrize("method, probes", [("hutchpp", 30), ("hutchinson", 12)])
def test_trace_standard_error_matches_the_spread_of_50_seeds(method, probes):
    # A 60-dimensional quadratic with a known trace, far more dimensions than the sketch (10).
    n, runs = 60, 50
    a = spd(n, seed=7)
    model = Quadratic(a, torch.zeros(n))
    x, y = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
    est = [trace_estimate(model, quad_loss(a), x, y, probes=probes, method=method, seed=s) for s in range(runs)]
    spread = np.std([e.value for e in est], ddof=1)
    # The root mean square of the reported standard errors (its square is unbiased for the
    # variance) against the standard deviation of the 50 estimates.
    reported = math.sqrt(np.mean([e.stderr**2 for e in est]))
    assert spread / 1.5 < reported < spread * 1.5
    assert all(e.products == probes for e in est)
    assert abs(np.mean([e.value for e in est]) - float(a.trace())) < 4 * spread / math.sqrt(runs)
    if method == "hutchinson":
        # And against the closed form: Rademacher variance 2 sum_{i != j} A_ij^2 per probe.
        off = a - torch.diag(torch.diag(a))
        assert reported == pytest.approx(math.sqrt(2 * float((off**2).sum()) / probes), rel=0.2)


def test_a_relative_standard_error_target_stops_the_trace_when_met():
    n = 60
    a = spd(n, seed=8)
    model = Quadratic(a, torch.zeros(n))
    x, y = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
    loose = trace_estimate(model, quad_loss(a), x, y, probes=400, sketch=5, rel_se=0.05)
    tight = trace_estimate(model, quad_loss(a), x, y, probes=400, sketch=5, rel_se=0.01)
    for est, target in ((loose, 0.05), (tight, 0.01)):
        assert est.stderr <= target * abs(est.value) or est.products == 400
    assert 10 + 10 <= loose.products < tight.products
    assert abs(tight.value - float(a.trace())) < 4 * tight.stderr
    # An exact trace (the sketch spans the space) has no error.
    assert trace_estimate(model, quad_loss(a), x, y, probes=3 * n).stderr == 0.0


def test_lanczos_reports_products_and_a_residual_that_bounds_its_error(quad):
    model, loss, x, y, a, _ = quad
    eig = torch.linalg.eigvalsh(a)
    for iters in (3, 5):
        est = top_eig_estimate(model, loss, x, y, iters=iters, tol=0.0, seed=2)
        assert est.products == iters
        # A true eigenvalue lies within the residual bound of the Ritz value, and the bound is
        # not vacuous: the error of the top Ritz value is of its order.
        assert float((eig - est.value[0]).abs().min()) <= est.residual
        assert est.residual < float(eig[-1] - eig[0])
    converged = top_eig_estimate(model, loss, x, y, iters=12, tol=1e-8)
    assert converged.residual <= 1e-8 * converged.value[0] + 1e-12


def test_average_sharpness_standard_error_matches_the_spread_of_50_seeds(quad):
    model, loss, x, y, a, _ = quad
    est = [avg_sharpness_estimate(model, loss, x, y, sigma=0.05, samples=8, seed=s) for s in range(50)]
    spread = np.std([e.value for e in est], ddof=1)
    reported = math.sqrt(np.mean([e.stderr**2 for e in est]))
    assert spread / 1.5 < reported < spread * 1.5
    # Closed form of one antithetic pair on a quadratic: 0.5 z^T B z, variance 0.5 tr(B^2).
    b = 0.05**2 * a
    assert reported == pytest.approx(math.sqrt(0.5 * float((b @ b).trace()) / 8), rel=0.25)


def test_every_measure_logs_its_seconds_and_the_estimators_their_uncertainty():
    model = small_net()
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(24))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(25))
    out = measure_sharpness(
        model, F.cross_entropy, x, y, measures=list(MEASURES), ggn_trace={"probes": 10}, hessian_trace={"probes": 10}
    )
    for name in MEASURES:
        assert out[f"sharpness/{name}/seconds"] > 0, name
    for name in ("hessian_top_eig", "ggn_top_eig"):
        assert 1 <= out[f"sharpness/{name}/products"] <= 40
        assert out[f"sharpness/{name}/residual"] <= 1e-3 * abs(out[f"sharpness/{name}"]) + 1e-12
    for name in ("hessian_trace", "ggn_trace", "avg_sharpness"):
        assert out[f"sharpness/{name}/stderr"] > 0, name
    assert out["sharpness/hessian_trace/products"] == out["sharpness/ggn_trace/products"] == 10
    # The GGN's top eigenvalue is the Hessian's Gauss-Newton part: close, not equal, here.
    assert out["sharpness/ggn_top_eig"] > 0


# ------------------------------------------------------------------------------ time budget
def test_a_tiny_budget_skips_the_costly_measures_and_says_why(monkeypatch):
    import samtune.sharpness.measures as measures_module

    # One gradient pass "takes" 1 s: m_sharpness (2 passes) and avg_sharpness (17/3) fit in a
    # 10 s budget, the Hessian measures (1 + 4 x 24 and 1 + 4 x 40 passes) do not.
    monkeypatch.setattr(measures_module, "gradient_pass_seconds", lambda *args: 1.0)
    model = small_net()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    chosen = ["hessian_top_eig", "hessian_trace", "avg_sharpness", "m_sharpness"]
    out = measure_sharpness(model, F.cross_entropy, x, y, measures=chosen, budget_s=10.0)
    assert "sharpness/m_sharpness" in out and "sharpness/avg_sharpness" in out
    for name, passes in (("hessian_trace", 97.0), ("hessian_top_eig", 161.0)):
        assert f"sharpness/{name}" not in out
        assert out[f"sharpness/{name}/skipped"] == 1.0
        assert out[f"sharpness/{name}/expected_s"] == passes
        assert 0 < out[f"sharpness/{name}/left_s"] <= 10.0
    # Cheapest first: the logged keys come in the order the measures ran.
    ran = [k.split("/")[1] for k in out if k.endswith("/seconds") or k.endswith("/skipped")]
    assert ran == ["m_sharpness", "avg_sharpness", "hessian_trace", "hessian_top_eig"]
    note = skipped_note(out)
    assert "hessian_trace skipped: expected 97.0 s" in note and "hessian_top_eig skipped" in note
    # No budget: everything runs and nothing is skipped.
    full = measure_sharpness(model, F.cross_entropy, x, y, measures=chosen)
    assert skipped_note(full) is None and all(f"sharpness/{n}" in full for n in chosen)
    with pytest.raises(ValueError, match="budget_s"):
        measure_sharpness(model, F.cross_entropy, x, y, measures=chosen, budget_s=0)


def test_a_trial_with_a_tiny_sharpness_budget_reports_what_it_skipped():
    from samtune.contract.metrics import SHARPNESS_SKIPPED_NOTE
    from samtune.trial.entry import fit

    torch.set_default_dtype(torch.float32)
    config = {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 1,
        "data_subset": 256,
        "sharpness_subset": 64,
        "sharpness_measures": ("m_sharpness", "hessian_trace"),
        "sharpness_budget_s": 1e-3,
    }
    last = fit(config)
    assert last["sharpness/hessian_trace/skipped"] == 1.0 and "sharpness/hessian_trace" not in last
    assert "hessian_trace skipped" in last[SHARPNESS_SKIPPED_NOTE]


def spectrum_net():
    """A few hundred parameters, trained a little so the Hessian is not that of the start."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    )
    x = torch.randn(48, 5, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(6))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_top_five_eigenvalues_and_their_spread_match_a_dense_hessian_within_the_residual():
    model, x, y = spectrum_net()
    dense = dense_hessian(model, x, y)
    ref = torch.linalg.eigvalsh(dense).flip(0)[:5].tolist()
    assert 200 <= dense.shape[0] <= 400
    logged = measure_sharpness(
        model, F.cross_entropy, x, y, measures=["hessian_top_eig"], batch=48, hessian_top_eig={"k": 5, "iters": 80}
    )
    lams = [logged["sharpness/hessian_top_eig"]] + [logged[f"sharpness/hessian_top_eig_{i}"] for i in range(2, 6)]
    bound = logged["sharpness/hessian_top_eig/residual"]
    # Lanczos's residual bound: each Ritz value lies within it of a true eigenvalue; with the
    # top five converged they are the top five.
    assert bound <= 1e-3 * lams[0]
    assert all(abs(lam - r) <= bound + 1e-9 for lam, r in zip(lams, ref)), (lams, ref, bound)
    assert logged["sharpness/hessian_top_eig_1_over_5"] == pytest.approx(ref[0] / ref[4], rel=4 * bound / ref[4])


def test_spectral_density_moments_and_interval_mass_match_the_dense_eigenvalues():
    model, x, y = spectrum_net()
    dense = dense_hessian(model, x, y)
    n = dense.shape[0]
    eig = torch.linalg.eigvalsh(dense)
    probes = 8
    density = spectral_density(model, F.cross_entropy, x, y, probes=probes, steps=n, seed=1, batch=48)
    assert density.n == n and torch.allclose(density.weights.sum(1), torch.ones(probes, dtype=torch.float64))
    # Full-length Lanczos: every node carrying weight is a true eigenvalue.
    heavy = density.nodes[density.weights > 1e-10]
    assert float((heavy[:, None] - eig[None]).abs().min(1).values.max()) <= 1e-6 * float(eig.abs().max())
    # Moment p is a Hutchinson estimate of tr(H^p)/n: Rademacher variance 2 sum_{i != j} (H^p)_ij^2
    # per probe; 4 standard errors over the probes.
    for p in (1, 2):
        hp = torch.linalg.matrix_power(dense, p)
        se = math.sqrt(2 * float((hp**2).sum() - (hp.diagonal() ** 2).sum()) / probes) / n
        assert abs(density.moment(p) - float(hp.trace()) / n) <= 4 * se + 1e-12
    # The mass of an interval is ||P v||^2 / n per probe: mean count/n, standard deviation at
    # most sqrt(2 rank P)/n per probe.
    for low, high in ((-math.inf, 0.0), (0.0, 1e-3), (1e-3, math.inf), (float(eig[-8]), math.inf)):
        count = int(((eig >= low) & (eig <= high)).sum())
        mass = density.mass(low, high)
        assert abs(mass - count / n) <= 4 * math.sqrt(2 * count / probes) / n + 1e-12, (low, high, mass, count / n)
    grid = torch.linspace(float(eig[0]) - 1.0, float(eig[-1]) + 1.0, 20001)
    curve = density.curve(grid, sigma=0.01)
    assert float(torch.trapezoid(curve, grid)) == pytest.approx(1.0, abs=1e-3)


def test_m_sharpness_at_several_m_logs_each_and_keeps_the_single_m_key():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    out = measure_sharpness(
        model, F.cross_entropy, x, y, measures=["m_sharpness"], m_sharpness={"m": 16, "ms": [4, 8, 64]}
    )
    # 64 is more than the subset: measured on the whole subset, logged under the m it used.
    for m in (4, 8, 32):
        assert out[f"sharpness/m_sharpness_at_m{m}"] == pytest.approx(m_sharpness(model, F.cross_entropy, x, y, m=m))
    assert "sharpness/m_sharpness_at_m64" not in out and out["sharpness/m_sharpness/ms"] == 3
    assert out["sharpness/m_sharpness"] == pytest.approx(m_sharpness(model, F.cross_entropy, x, y, m=16))
    # One-step m-sharpness (rho ||g_B|| to first order) averages per-batch gradient norms, which
    # shrink as the batches grow: smaller m, larger value.
    assert out["sharpness/m_sharpness_at_m4"] > out["sharpness/m_sharpness_at_m32"]


def test_the_density_the_sweep_logs_is_pyhessians_and_its_mass_below_a_cut_is_the_dense_spectrums():
    """`samtune.sweep.spectra` draws the density on PyHessian's grid with PyHessian's widening:
    the same curve as PyHessian's ``density_generate`` formula (written out here) on the same
    nodes and weights, and, with full-length Lanczos, its area below any cut between eigenvalues
    is the dense Hessian's share of eigenvalues there, within the probes' error."""
    from samtune.sweep.spectra import SETTINGS, density_grid

    model, x, y = spectrum_net()
    eig = torch.linalg.eigvalsh(dense_hessian(model, x, y)).double()
    n, probes = len(eig), 8
    density = spectral_density(model, F.cross_entropy, x, y, probes=probes, steps=n, seed=3, batch=48)
    settings = {**SETTINGS, "bins": 6000}
    grid, sigma = density_grid([float(density.nodes.min())], [float(density.nodes.max())], settings)
    curve = density.curve(grid, sigma).numpy()
    # PyHessian (density_generate): sigma_squared * max(1, |ends|) is the Gaussians' variance,
    # the mean over probes normalised by its sum times the bin width.
    g, nodes, w = grid.numpy(), density.nodes.numpy(), density.weights.numpy()
    s2 = settings["sigma_squared"] * max(1.0, abs(g[0]), abs(g[-1]))
    gauss = np.exp(-((g[:, None, None] - nodes[None]) ** 2) / (2 * s2)) / np.sqrt(2 * np.pi * s2)
    reference = (gauss * w[None]).sum(2).mean(1)
    reference /= reference.sum() * (g[1] - g[0])
    np.testing.assert_allclose(curve, reference, rtol=2e-3, atol=1e-9 * reference.max())
    # Cuts in the widest gaps between eigenvalues, far from any in units of the widening.
    gaps = sorted(range(n - 1), key=lambda i: float(eig[i + 1] - eig[i]))[-4:]
    for i in gaps:
        cut = float(eig[i] + eig[i + 1]) / 2
        assert float(eig[i + 1] - eig[i]) > 20 * sigma
        below = i + 1
        area = float(np.trapezoid(curve[g <= cut], g[g <= cut]))
        rank = min(below, n - below)
        assert abs(area - below / n) <= 4 * math.sqrt(2 * rank / probes) / n + 2e-3, (cut, area, below / n)

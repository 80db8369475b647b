"""SAM / ASAM and the m-sharpness step, checked against closed forms and hand-written references."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samtune.optim.sam import SAM
from samtune.optim.step import sam_step


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def batch(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# -- eps in closed form -------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_moves_to_closed_form_eps_on_a_quadratic(adaptive):
    torch.manual_seed(0)
    q = torch.randn(5, 5, dtype=torch.float64)
    a = q @ q.T + torch.eye(5, dtype=torch.float64)
    w0 = torch.randn(5, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = SAM([w], rho=0.3, adaptive=adaptive, eta=0.05, lr=0.1)
    (0.5 * w @ a @ w).backward()
    opt.first_step()
    g = a @ w0  # the known gradient of 0.5 w^T A w
    if adaptive:
        t = w0.abs() + 0.05
        eps = 0.3 * t * t * g / torch.linalg.norm(t * g)
    else:
        eps = 0.3 * g / torch.linalg.norm(g)
    torch.testing.assert_close(w.detach() - w0, eps, rtol=1e-10, atol=1e-12)


def test_eps_norm_is_global_over_parameter_groups():
    a, b = nn.Parameter(torch.tensor([3.0])), nn.Parameter(torch.tensor([0.0, 4.0]))
    opt = SAM([{"params": [a]}, {"params": [b]}], rho=1.0, lr=0.1)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([0.0, 4.0])
    opt.first_step()
    # ||g|| = 5 over both groups together, not per group.
    torch.testing.assert_close(a.detach(), torch.tensor([3.0 + 0.6]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.0, 4.8]))


def test_weight_decay_enters_eps_only_when_asked():
    w0 = torch.tensor([1.0, 2.0])
    for perturb_wd, expected_dir in [(False, torch.tensor([1.0, 0.0])), (True, torch.tensor([1.5, 1.0]))]:
        w = nn.Parameter(w0.clone())
        opt = SAM([w], rho=1.0, lr=0.1, weight_decay=0.5, perturb_weight_decay=perturb_wd)
        w.grad = torch.tensor([1.0, 0.0])
        opt.first_step()
        torch.testing.assert_close(w.detach() - w0, expected_dir / expected_dir.norm())


# -- the full update against a two-pass reference ---------------------------------------------


def reference_sam_sgd(model, x, y, rho, lr, momentum, wd, steps, adaptive=False, eta=0.01):
    """Plain autograd SAM with SGD+momentum written out by hand: the paper's algorithm."""
    params = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    bufs = [None] * len(params)
    for _ in range(steps):

        def loss_at(ws):
            return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ws)), (x,)), y)

        ws = [p.clone().requires_grad_() for p in params]
        g = torch.autograd.grad(loss_at(ws), ws)
        if adaptive:
            t = [p.abs() + eta for p in params]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
            eps = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
        else:
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            eps = [rho * gi / norm for gi in g]
        wp = [(p + e).requires_grad_() for p, e in zip(params, eps)]
        g2 = torch.autograd.grad(loss_at(wp), wp)
        for i, (p, gi) in enumerate(zip(params, g2)):
            d = gi + wd * p
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
            params[i] = p - lr * bufs[i]
    return params


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_hand_written_two_pass_reference(adaptive):
    model = mlp()
    x, y = batch()
    expected = reference_sam_sgd(
        copy.deepcopy(model), x, y, rho=0.1, lr=0.2, momentum=0.9, wd=1e-3, steps=3, adaptive=adaptive
    )
    opt = SAM(model.parameters(), rho=0.1, adaptive=adaptive, lr=0.2, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        sam_step(model, F.cross_entropy, x, y, opt)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_step_with_closure_equals_sam_step():
    x, y = batch()
    m1, m2 = mlp(), mlp()
    o1 = SAM(m1.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), rho=0.05, lr=0.1, momentum=0.9)

    def closure():
        o1.zero_grad()
        loss = F.cross_entropy(m1(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        l1 = o1.step(closure)
        l2, _ = sam_step(m2, F.cross_entropy, x, y, o2)
        assert torch.equal(l1.detach(), l2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_step_without_closure_names_what_is_missing():
    opt = SAM(mlp().parameters(), rho=0.05, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


@pytest.mark.parametrize(
    "base, kwargs",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    ],
)
def test_rho_zero_is_bit_identical_to_the_base_optimizer(base, kwargs):
    x, y = batch()
    m_sam, m_base, m_closure = mlp(bn=True), mlp(bn=True), mlp(bn=True)
    o_sam = SAM(m_sam.parameters(), base_optimizer=base, rho=0.0, **kwargs)
    o_closure = SAM(m_closure.parameters(), base_optimizer=base, rho=0.0, **kwargs)
    o_base = base(m_base.parameters(), **kwargs)
    passes = 0

    def count(*_):
        nonlocal passes
        passes += 1

    m_sam.register_forward_hook(count)
    for _ in range(4):
        sam_step(m_sam, F.cross_entropy, x, y, o_sam)
        o_base.zero_grad()
        F.cross_entropy(m_base(x), y).backward()
        o_base.step()

        def closure():
            o_closure.zero_grad()
            loss = F.cross_entropy(m_closure(x), y)
            loss.backward()
            return loss

        o_closure.step(closure)
    assert passes == 4  # one pass per step
    for a, b, c in zip(m_sam.state_dict().values(), m_base.state_dict().values(), m_closure.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(c, b)


def test_weights_return_exactly_to_w_before_the_base_step():
    w = nn.Parameter(torch.tensor([0.1, 1e8, -3.3]))
    w0 = w.detach().clone()
    opt = SAM([w], rho=0.7, lr=0.0)
    w.grad = torch.tensor([1.0, 1e-3, 2.0])
    opt.first_step()
    assert not torch.equal(w.detach(), w0)
    opt.second_step()
    assert torch.equal(w.detach(), w0)  # restored, not w + eps - eps


# -- m-sharpness ------------------------------------------------------------------------------


def reference_grouped_gradient(model, x, y, m, rho, adaptive=False, eta=0.01, wd_in_eps=0.0, loss_fn=F.cross_entropy):
    """Explicit loop over groups: eps_j from group j's gradient (SAM: rho d / ||d||, ASAM:
    rho T^2 d / ||T d|| with T = |w| + eta, d = g + wd_in_eps * w), gradient of group j at
    w + eps_j, averaged. Written without the library. A model in train mode normalises each group
    by its own batch statistics."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    groups = x.shape[0] // m

    def grad_at(ws, xs, ys):
        ws = [w.clone().requires_grad_() for w in ws]
        return torch.autograd.grad(loss_fn(torch.func.functional_call(model, dict(zip(names, ws)), (xs,)), ys), ws)

    for j in range(groups):
        xs, ys = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
        d = [gi + wd_in_eps * p for gi, p in zip(grad_at(params, xs, ys), params)]
        t = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((ti * di) ** 2).sum() for ti, di in zip(t, d)))
        eps = [rho * ti * ti * di / norm for ti, di in zip(t, d)]
        g2 = grad_at([p + e for p, e in zip(params, eps)], xs, ys)
        total = [tot + gi / groups for tot, gi in zip(total, g2)]
    return total


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("m", [4, 8, 12])
def test_grouped_step_equals_explicit_loop_over_groups(vectorize, m):
    model = mlp()
    x, y = batch(24)
    expected_grad = reference_grouped_gradient(copy.deepcopy(model), x, y, m, rho=0.2)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), rho=0.2, lr=0.5)  # plain SGD: w1 = w0 - lr * grad
    loss, logits = sam_step(model, F.cross_entropy, x, y, opt, m=m, vectorize=vectorize)
    for p, p0, g in zip(model.parameters(), w0, expected_grad):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g, rtol=1e-10, atol=1e-12)
    # First-pass outputs are the model's at w, for logging.
    model_at_w0 = copy.deepcopy(model)
    with torch.no_grad():
        for p, p0 in zip(model_at_w0.parameters(), w0):
            p.copy_(p0)
    torch.testing.assert_close(logits, model_at_w0(x))
    torch.testing.assert_close(loss, F.cross_entropy(model_at_w0(x), y))


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("perturb_wd", [False, True])
def test_grouped_step_equals_explicit_loop_with_asam_and_weight_decay_in_eps(vectorize, adaptive, perturb_wd):
    model = mlp()
    x, y = batch(24)
    lr, wd, eta = 0.5, 0.05, 0.1
    expected_grad = reference_grouped_gradient(
        copy.deepcopy(model), x, y, 8, rho=0.2, adaptive=adaptive, eta=eta, wd_in_eps=wd if perturb_wd else 0.0
    )
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(
        model.parameters(), rho=0.2, adaptive=adaptive, eta=eta, lr=lr, weight_decay=wd, perturb_weight_decay=perturb_wd
    )
    sam_step(model, F.cross_entropy, x, y, opt, m=8, vectorize=vectorize)
    # Plain SGD with weight decay: w1 = w0 - lr * (grad + wd * w0).
    for p, p0, g in zip(model.parameters(), w0, expected_grad):
        torch.testing.assert_close(p.detach(), p0 - lr * (g + wd * p0), rtol=1e-10, atol=1e-12)


def test_grouped_step_with_m_equal_to_batch_is_classic_sam():
    x, y = batch(24)
    a, b = mlp(), mlp()
    oa, ob = SAM(a.parameters(), rho=0.1, lr=0.1), SAM(b.parameters(), rho=0.1, lr=0.1)
    sam_step(a, F.cross_entropy, x, y, oa, m=24)
    sam_step(b, F.cross_entropy, x, y, ob, m=None)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# -- BatchNorm ----------------------------------------------------------------------------------


def test_batchnorm_statistics_advance_once_per_whole_batch_step():
    x, y = batch(24)
    model = mlp(bn=True)
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), rho=0.5, lr=0.1)
    sam_step(model, F.cross_entropy, x, y, opt)
    reference(x)  # exactly one train-mode forward at w
    bn, ref_bn = model[1], reference[1]
    assert bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


@pytest.mark.parametrize("vectorize", [True, False])
def test_batchnorm_statistics_advance_once_per_grouped_step(vectorize):
    x, y = batch(24)
    model = mlp(bn=True)
    lin = copy.deepcopy(model[0])
    opt = SAM(model.parameters(), rho=0.5, lr=0.1)
    sam_step(model, F.cross_entropy, x, y, opt, m=8, vectorize=vectorize)
    bn = model[1]
    assert bn.num_batches_tracked.item() == 1
    # One momentum update with the mean of the three groups' batch statistics.
    with torch.no_grad():
        h = lin(x).reshape(3, 8, 16)
    mean = h.mean(1).mean(0)
    var = h.var(1, unbiased=True).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var)


@pytest.mark.parametrize("vectorize", [True, False])
def test_grouped_step_with_batchnorm_equals_a_per_group_reference(vectorize):
    x, y = batch(24)
    model = mlp(bn=True)
    # In train mode each group is normalised by its own batch statistics, in both passes.
    expected_grad = reference_grouped_gradient(copy.deepcopy(model), x, y, 8, rho=0.5)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), rho=0.5, lr=0.3)
    sam_step(model, F.cross_entropy, x, y, opt, m=8, vectorize=vectorize)
    for p, p0, g in zip(model.parameters(), w0, expected_grad):
        torch.testing.assert_close(p.detach(), p0 - 0.3 * g, rtol=1e-10, atol=1e-12)


def test_vmap_failure_falls_back_to_the_loop_with_batchnorm_advanced_once(monkeypatch):
    import samtune.optim.msharpness as sam_module

    x, y = batch(24)
    loop_model, auto_model = mlp(bn=True), mlp(bn=True)
    sam_step(loop_model, F.cross_entropy, x, y, SAM(loop_model.parameters(), rho=0.5, lr=0.3), m=8, vectorize=False)

    real_vmap, calls = sam_module.vmap, []

    def vmap_that_fails_on_the_second_pass(*args, **kwargs):
        batched = real_vmap(*args, **kwargs)

        def call(*inputs):
            calls.append(len(calls))
            if len(calls) == 2:  # after the first pass has run, as an op without a batching rule would
                raise RuntimeError("no batching rule")
            return batched(*inputs)

        return call

    # The automatic route takes vmap off CPU; pretend this CPU is such a device.
    monkeypatch.setattr(sam_module, "vmap_by_default", lambda device: True)
    monkeypatch.setattr(sam_module, "vmap", vmap_that_fails_on_the_second_pass)
    sam_step(auto_model, F.cross_entropy, x, y, SAM(auto_model.parameters(), rho=0.5, lr=0.3), m=8)
    assert len(calls) == 2  # vmap was tried, failed, and the loop took over
    for (name, a), b in zip(auto_model.state_dict().items(), loop_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    assert auto_model[1].num_batches_tracked.item() == 1
    # And the loop's statistics are the one-update closed form (as in the test above).
    with torch.no_grad():
        h = mlp()[0](x).reshape(3, 8, 16)
    torch.testing.assert_close(auto_model[1].running_mean, 0.1 * h.mean(1).mean(0))


def test_grouped_step_keeps_frozen_batchnorm_counters_still():
    from samtune.models.heads import freeze_batchnorm_stats

    x, y = batch(24)
    for vectorize in (True, False):
        model = freeze_batchnorm_stats(mlp(bn=True))
        before = copy.deepcopy(model[1].state_dict())
        sam_step(model, F.cross_entropy, x, y, SAM(model.parameters(), rho=0.5, lr=0.3), m=8, vectorize=vectorize)
        for key, value in model[1].state_dict().items():
            if key.startswith("running") or key == "num_batches_tracked":
                assert torch.equal(value, before[key]), (vectorize, key)


# -- parameters that get no gradient --------------------------------------------------------------


class TwoBranch(nn.Module):
    """`extra` takes part only while `use_extra` is set (an unused branch, as DDP's
    find_unused_parameters handles)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(6, 3).double()
        self.extra = nn.Linear(6, 3).double()
        self.use_extra = True

    def forward(self, x):
        out = self.shared(x)
        return out + self.extra(x) if self.use_extra else out


@pytest.mark.parametrize("first_route", ["whole", "grouped"])
@pytest.mark.parametrize("scaled", [False, True])
def test_a_parameter_unused_in_a_step_keeps_the_value_the_base_optimizer_left(first_route, scaled):
    x, y = batch(24)
    model = TwoBranch()
    opt = SAM(model.parameters(), rho=0.5, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    m = 8 if first_route == "grouped" else None
    sam_step(model, F.cross_entropy, x, y, opt, m=m, vectorize=False, scaler=scaler)
    after_first = [p.detach().clone() for p in model.extra.parameters()]
    model.use_extra = False
    sam_step(model, F.cross_entropy, x, y, opt, scaler=scaler)
    # torch.optim.SGD leaves a parameter without a gradient where it is (momentum included).
    for p, p1 in zip(model.extra.parameters(), after_first):
        assert torch.equal(p.detach(), p1)


def test_second_step_restores_only_what_first_step_moved():
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0]))
    opt = SAM([a, b], rho=0.1, lr=1.0)
    a.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([1.0])
    opt.first_step()
    opt.second_step()  # both step: a = (1, 2) - (1, 0), b = 3 - 1
    opt.zero_grad()
    a.grad = torch.tensor([0.0, 1.0])  # b has no gradient this step
    opt.first_step()
    opt.second_step()
    torch.testing.assert_close(a.detach(), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([2.0]))


# -- non-finite gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_leaves_the_weights_at_w_in_first_step(adaptive, bad):
    w, v = nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([0.5]))
    opt = SAM([{"params": [w]}, {"params": [v]}], rho=0.5, adaptive=adaptive, lr=0.1)
    w.grad, v.grad = torch.tensor([bad, 1.0]), torch.tensor([2.0])
    opt.first_step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))
    assert torch.equal(v.detach(), torch.tensor([0.5]))


def test_grouped_eps_is_zero_for_a_group_with_a_non_finite_gradient():
    from samtune.optim.msharpness import group_eps

    w = nn.Parameter(torch.zeros(2))
    opt = SAM([w], rho=0.5, lr=0.1)
    grads = torch.tensor([[3.0, 4.0], [float("inf"), 1.0], [float("nan"), 0.0]])
    eps = group_eps([grads], [w.detach()], opt.param_groups, opt)[0]
    torch.testing.assert_close(eps[0], torch.tensor([0.3, 0.4]))  # 0.5 * (3, 4) / 5
    assert torch.equal(eps[1:], torch.zeros(2, 2))


# -- fp16 loss scaling ------------------------------------------------------------------------------


class HalfPrecisionGradient(torch.autograd.Function):
    """Identity forward; the backward rounds the incoming gradient to float16, as a float16
    activation would, so small gradients underflow to zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.half().to(grad.dtype)


class HalfGradientLayer(nn.Module):
    def forward(self, x):
        return HalfPrecisionGradient.apply(x)


@pytest.mark.parametrize("m, vectorize", [(None, None), (8, True), (8, False)])
def test_scaled_first_pass_keeps_small_fp16_gradients_from_underflowing(m, vectorize):
    def tiny_loss(out, y):  # gradients of ~1e-9 at the float16 layer: zero unless scaled
        return 1e-8 * F.cross_entropy(out, y)

    x, y = batch(24)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), HalfGradientLayer(), nn.Linear(16, 3)).double()
    exact = copy.deepcopy(model)
    exact[2] = nn.Identity()
    expected_grad = reference_grouped_gradient(exact, x, y, m or 24, rho=0.5, loss_fn=tiny_loss)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), rho=0.5, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    sam_step(model, tiny_loss, x, y, opt, m=m, vectorize=vectorize, scaler=scaler)
    for p, p0, g in zip(model.parameters(), w0, expected_grad):
        # float16 keeps about 3 significant digits of each scaled gradient.
        torch.testing.assert_close(p0 - p.detach(), g, rtol=5e-3, atol=2e-3 * g.abs().max().item())


@pytest.mark.parametrize("m, vectorize", [(None, None), (8, True), (8, False)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_weight_decay_in_eps_is_the_same_with_a_grad_scaler(m, vectorize, adaptive):
    x, y = batch(24)
    model = mlp()
    lr, wd = 0.5, 0.05
    expected_grad = reference_grouped_gradient(
        copy.deepcopy(model), x, y, m or 24, rho=0.2, adaptive=adaptive, eta=0.1, wd_in_eps=wd
    )
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(
        model.parameters(), rho=0.2, adaptive=adaptive, eta=0.1, lr=lr, weight_decay=wd, perturb_weight_decay=True
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    sam_step(model, F.cross_entropy, x, y, opt, m=m, vectorize=vectorize, scaler=scaler)
    for p, p0, g in zip(model.parameters(), w0, expected_grad):
        torch.testing.assert_close(p.detach(), p0 - lr * (g + wd * p0), rtol=1e-10, atol=1e-12)


# -- state, schedulers -------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_the_same_trajectory(tmp_path):
    x, y = batch()
    model = mlp()
    opt = SAM(model.parameters(), base_optimizer=torch.optim.AdamW, rho=0.05, lr=1e-2)
    for _ in range(2):
        sam_step(model, F.cross_entropy, x, y, opt)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for _ in range(3):
        sam_step(model, F.cross_entropy, x, y, opt)

    resumed = mlp(seed=5)
    opt2 = SAM(resumed.parameters(), base_optimizer=torch.optim.AdamW, rho=0.9, lr=0.5)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    assert opt2.param_groups[0]["rho"] == 0.05 and opt2.param_groups[0]["lr"] == 1e-2
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    for _ in range(3):
        sam_step(resumed, F.cross_entropy, x, y, opt2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_base_optimizer_without_warnings():
    x, y = batch()
    model = mlp()
    opt = SAM(model.parameters(), rho=0.05, lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            sam_step(model, F.cross_entropy, x, y, opt)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(
        0.1 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()) / 2
    )


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rho=-0.1), r"rho must be a number >= 0.*rho=-0.1"),
        (dict(rho="0.1"), r"rho must be a number"),
        (dict(adaptive=True, eta=0.0), r"eta must be > 0.*eta=0.0"),
        (dict(adaptive=True, eta=-1), r"eta must be > 0"),
        (dict(base_optimizer="sgd"), r"base_optimizer must be a torch.optim.Optimizer class"),
    ],
)
def test_bad_optimizer_settings_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAM(mlp().parameters(), **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize(
    "group, message",
    [
        ({"adaptive": True, "eta": 0}, r"parameter group 1: eta must be > 0 for adaptive SAM \(ASAM\), got eta=0"),
        ({"adaptive": True, "eta": -0.5}, r"parameter group 1: eta must be > 0.*eta=-0.5"),
        ({"rho": -1}, r"parameter group 1: rho must be a number >= 0.*rho=-1"),
        (
            {"adaptive": "yes"},
            r"parameter group 1: adaptive must be True \(ASAM\) or False \(SAM\), got adaptive='yes'",
        ),
    ],
)
@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
def test_bad_group_settings_raise_a_clear_error(group, message, how):
    model = mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    if how == "constructor":
        with pytest.raises(ValueError, match=message):
            SAM([{"params": first}, {"params": second, **group}], lr=0.1)
    else:
        opt = SAM(first, lr=0.1)
        with pytest.raises(ValueError, match=message):
            opt.add_param_group({"params": second, **group})
        assert len(opt.param_groups) == 1


def test_add_param_group_fills_sam_defaults_and_the_base_optimizer_steps_the_group():
    model = mlp()
    opt = SAM(model[0].parameters(), rho=0.1, adaptive=True, eta=0.2, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": list(model[2].parameters()), "rho": 0.3})
    group = opt.param_groups[1]
    assert (group["rho"], group["adaptive"], group["eta"], group["momentum"]) == (0.3, True, 0.2, 0.9)
    assert opt.base_optimizer.param_groups is opt.param_groups
    before = [p.detach().clone() for p in model[2].parameters()]
    x, y = batch()
    sam_step(model, F.cross_entropy, x, y, opt)
    assert all(not torch.equal(p, b) for p, b in zip(model[2].parameters(), before))


@pytest.mark.parametrize(
    "m, message",
    [
        (0, r"positive integer, got m=0"),
        (-4, r"positive integer, got m=-4"),
        (2.5, r"positive integer, got m=2.5"),
        (5, r"m=5 must divide the local batch size 24"),
        (48, r"m=48 must divide the local batch size 24"),
    ],
)
def test_bad_m_raises_a_clear_error(m, message):
    model = mlp()
    x, y = batch(24)
    with pytest.raises(ValueError, match=message):
        sam_step(model, F.cross_entropy, x, y, SAM(model.parameters(), lr=0.1), m=m)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sync_perturbation=True), r"sync_perturbation=True .* contradicts m=8.*local batch of 24"),
        (dict(perturbation_group=object()), r"perturbation_group .* contradicts m=8.*use m=None \(or m=24\)"),
    ],
)
def test_shared_perturbation_with_m_sharpness_groups_is_refused(kwargs, message):
    model = mlp()
    x, y = batch(24)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        sam_step(model, F.cross_entropy, x, y, SAM(model.parameters(), lr=0.1), m=8, **kwargs)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_plain_optimizer_takes_one_plain_step():
    x, y = batch()
    a, b = mlp(), mlp()
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    sam_step(a, F.cross_entropy, x, y, oa)
    ob.zero_grad()
    F.cross_entropy(b(x), y).backward()
    ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)

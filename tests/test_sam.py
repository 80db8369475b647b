"""SAM / ASAM and the m-sharpness step, checked against closed forms and hand-written references."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samtune.sam import SAM, sam_step


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
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
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
    expected = reference_sam_sgd(copy.deepcopy(model), x, y, rho=0.1, lr=0.2, momentum=0.9,
                                 wd=1e-3, steps=3, adaptive=adaptive)
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


@pytest.mark.parametrize("base, kwargs", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
])
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


def reference_grouped_gradient(model, x, y, m, rho):
    """Explicit loop over groups: eps_j from group j's gradient, gradient of group j at w+eps_j,
    averaged. Written without the library."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    groups = x.shape[0] // m
    for j in range(groups):
        xs, ys = x[j * m:(j + 1) * m], y[j * m:(j + 1) * m]
        ws = [p.clone().requires_grad_() for p in params]
        g = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ws)), (xs,)), ys), ws)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        wp = [(p + rho * gi / norm).requires_grad_() for p, gi in zip(params, g)]
        g2 = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, dict(zip(names, wp)), (xs,)), ys), wp)
        total = [t + gi / groups for t, gi in zip(total, g2)]
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
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()) / 2)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(rho=-0.1), r"rho must be a number >= 0.*rho=-0.1"),
    (dict(rho="0.1"), r"rho must be a number"),
    (dict(adaptive=True, eta=0.0), r"eta must be > 0.*eta=0.0"),
    (dict(adaptive=True, eta=-1), r"eta must be > 0"),
    (dict(base_optimizer="sgd"), r"base_optimizer must be a torch.optim.Optimizer class"),
])
def test_bad_optimizer_settings_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAM(mlp().parameters(), **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("m, message", [
    (0, r"positive integer, got m=0"),
    (-4, r"positive integer, got m=-4"),
    (2.5, r"positive integer, got m=2.5"),
    (5, r"m=5 must divide the local batch size 24"),
    (48, r"m=48 must divide the local batch size 24"),
])
def test_bad_m_raises_a_clear_error(m, message):
    model = mlp()
    x, y = batch(24)
    with pytest.raises(ValueError, match=message):
        sam_step(model, F.cross_entropy, x, y, SAM(model.parameters(), lr=0.1), m=m)


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

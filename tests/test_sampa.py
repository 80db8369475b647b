"""SAMPa-lambda: the update written out by hand in this file, in one process and on two gloo
workers that compute one gradient each; the trial's checks of its settings; a Ray Train trial."""

import copy
import datetime
import gc
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_variants import batches, mlp
from torch import nn
from torch.func import functional_call

from samtune.optim import msharpness
from samtune.optim.sam import SAM
from samtune.optim.step import sam_step
from samtune.optim.variants import SAMPa, variant_from_config
from samtune.trial.config import TrialConfigError, perturbation_plan, resolve_config

RHO, LR, MOMENTUM, WD, LAM = 0.2, 0.1, 0.9, 1e-3, 0.2
STEPS = 5


def lr_at(t):
    """A learning rate that moves every step, so the auxiliary point's eta_t is checked."""
    return LR * (1.0 - t / 10)


def optimizer_and_schedule(model, lam=LAM, rho=RHO):
    opt = SAM(
        model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM, weight_decay=WD, variant=SAMPa(lam=lam)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_at(t) / LR)
    return opt, schedule


def train(model, data, opt, schedule):
    losses = []
    for x, y in data:
        loss, _ = sam_step(model, F.cross_entropy, x, y, opt)
        schedule.step()
        losses.append(float(loss))
    return losses


def grad_at(model, weights, x, y):
    leaves = {k: w.detach().clone().requires_grad_(True) for k, w in weights.items()}
    loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def sampa_by_hand(model, data, lam=LAM, rho=RHO):
    """SAMPa-lambda with SGD (momentum, weight decay), from the paper and the reference code:
    x~ = x + rho g_y / ||g_y||, y' = x - eta (mu buf + g_y + wd x), G = (1 - lam) grad(x~; previous
    batch) + lam grad(y'; this batch), then SGD from x with G; the first step at x on B_0."""
    x_w = {k: p.detach().clone() for k, p in model.named_parameters()}
    buf = g_y = previous = None
    for t, (x, y) in enumerate(data):
        eta = lr_at(t)
        if g_y is None:
            perturbed_at, aux_at, previous = x_w, x_w, (x, y)
        else:
            norm = math.sqrt(sum(float((g * g).sum()) for g in g_y.values()))
            perturbed_at = {k: x_w[k] + rho * g_y[k] / norm for k in x_w}
            aux_at = {k: x_w[k] - eta * (MOMENTUM * buf[k] + g_y[k] + WD * x_w[k]) for k in x_w}
        g_pert = grad_at(model, perturbed_at, *previous)
        g_aux = grad_at(model, aux_at, x, y)
        d = {k: (1 - lam) * g_pert[k] + lam * g_aux[k] + WD * x_w[k] for k in x_w}
        buf = d if buf is None else {k: MOMENTUM * buf[k] + d[k] for k in x_w}
        x_w = {k: x_w[k] - eta * buf[k] for k in x_w}
        g_y, previous = g_aux, (x, y)
    return x_w


def assert_weights(model, expected, tol=1e-10):
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach(), expected[k], atol=tol, rtol=0), k


# -- one process: the two gradients one after the other ------------------------------------------


def test_sampa_in_one_process_equals_the_update_by_hand():
    data = batches(STEPS)
    model = mlp()
    expected = sampa_by_hand(copy.deepcopy(model), data)
    opt, schedule = optimizer_and_schedule(model)
    train(model, data, opt, schedule)
    assert_weights(model, expected)
    assert opt.variant.steps == STEPS and opt.variant.passes == 2 * STEPS


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_sampa_lambda_ends(lam):
    """lambda = 0 is SAMPa-0 (only the perturbed gradient), 1 only the auxiliary one."""
    data = batches(STEPS)
    model = mlp()
    expected = sampa_by_hand(copy.deepcopy(model), data, lam=lam)
    opt, schedule = optimizer_and_schedule(model, lam=lam)
    train(model, data, opt, schedule)
    assert_weights(model, expected)


def test_sampa_first_step_is_the_plain_sgd_step():
    ((x, y),) = batches(1)
    model, plain = mlp(), mlp()
    opt, _ = optimizer_and_schedule(model)
    sam_step(model, F.cross_entropy, x, y, opt)
    sgd = torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    F.cross_entropy(plain(x), y).backward()
    sgd.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-15, rtol=0)


def test_sampa_with_rho_0_is_the_base_optimizer_bit_for_bit():
    data = batches(STEPS)
    model, plain = mlp(bn=True), mlp(bn=True)
    opt, _ = optimizer_and_schedule(model, rho=0.0)
    for x, y in data:
        sam_step(model, F.cross_entropy, x, y, opt)
    sgd = torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in data:
        sgd.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        sgd.step()
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_sampa_resumed_from_a_checkpoint_takes_the_same_next_updates(tmp_path):
    data = batches(STEPS + 2)
    model = mlp(bn=True)
    opt, schedule = optimizer_and_schedule(model)
    train(model, data[:3], opt, schedule)
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "schedule": schedule.state_dict()}, tmp_path / "ckpt.pt"
    )
    train(model, data[3:], opt, schedule)

    resumed = mlp(seed=4, bn=True)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    opt2, schedule2 = optimizer_and_schedule(resumed)
    opt2.load_state_dict(state["opt"])
    schedule2.load_state_dict(state["schedule"])
    train(resumed, data[3:], opt2, schedule2)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_sampa_batchnorm_statistics_advance_once_per_step_at_the_auxiliary_point():
    data = batches(2)
    model = mlp(bn=True)
    opt, _ = optimizer_and_schedule(model)
    for x, y in data:
        sam_step(model, F.cross_entropy, x, y, opt)
    assert int(model[1].num_batches_tracked) == 2


def test_sampa_refuses_m_groups_fp16_scaling_and_a_closure():
    model = mlp()
    ((x, y),) = batches(1)
    opt, _ = optimizer_and_schedule(model)
    with pytest.raises(ValueError, match=r"sam_variant='sampa' takes one perturbation per step.*m=8"):
        sam_step(model, F.cross_entropy, x, y, opt, m=8)
    with pytest.raises(ValueError, match="fp16 loss scaling"):
        sam_step(model, F.cross_entropy, x, y, opt, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="train with samtune.optim.step.sam_step"):
        opt.step(lambda: F.cross_entropy(model(x), y))


# -- two gloo workers: one gradient each, one all-reduce per step --------------------------------


def _paired_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        out = {}
        for bn in (False, True):
            out[bn] = _paired_run(bn)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        gc.collect()
        dist.destroy_process_group()


def _paired_run(bn):
    model = nn.parallel.DistributedDataParallel(mlp(bn=bn))
    ddp_rounds = []

    def counting(state, bucket):
        ddp_rounds.append(1)
        return torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting)
    opt, schedule = optimizer_and_schedule(model.module)
    own = msharpness.own_all_reduces
    losses = train(model, batches(STEPS), opt, schedule)  # both ranks of the pair: the same batches
    return {
        "state": {k: v.clone() for k, v in model.module.state_dict().items()},
        "losses": losses,
        "own": msharpness.own_all_reduces - own,
        "ddp": len(ddp_rounds),
    }


def test_sampa_on_two_gloo_workers_equals_the_update_by_hand(tmp_path):
    mp.spawn(_paired_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    data = batches(STEPS)
    expected = sampa_by_hand(mlp(), data)
    for bn in (False, True):
        a, b = r0[bn], r1[bn]
        # One collective per step, and none of DDP's own.
        assert a["own"] == b["own"] == STEPS and a["ddp"] == b["ddp"] == 0
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (bn, k)
        assert a["losses"] == b["losses"]
        # The same steps as one process computing both gradients one after the other.
        single = mlp(bn=bn)
        opt, schedule = optimizer_and_schedule(single)
        losses = train(single, data, opt, schedule)
        for k, v in single.state_dict().items():
            assert torch.allclose(a["state"][k].to(v.dtype), v, atol=1e-12, rtol=0), (bn, k)
        assert losses == pytest.approx(a["losses"], abs=1e-12)
    for k, v in expected.items():
        assert torch.allclose(r0[False]["state"][k], v, atol=1e-10, rtol=0), k


# -- the trial's settings ---------------------------------------------------------------------


def test_trial_config_pairs_the_workers_for_sampa():
    plan = perturbation_plan(
        resolve_config({"optimizer": "sam", "sam_variant": "sampa", "workers": 4, "batch_size": 64})
    )
    assert plan.paired and plan.data_shards == 2 and plan.per_worker_batch == 32
    assert plan.describe() == (
        "m=32: SAMPa on 2 pairs of workers, each pair on its own batch of 32, one gradient per worker"
    )
    assert variant_from_config({"sam_variant": "sampa", "sampa_lambda": 0.5}).lam == 0.5


@pytest.mark.parametrize(
    "config, message",
    [
        ({"workers": 3, "batch_size": 63}, "workers must be 1 or even, got workers=3"),
        ({"workers": 2, "m": 16}, r"local batch of 64, so it does not combine with m=16"),
        ({"workers": 2, "sync_perturbation": True}, "sync_perturbation=True"),
        ({"workers": 4, "batch_size": 65}, "batch_size=65 does not split evenly over the 2 pairs"),
        ({"m": 16}, r"sam_variant='sampa' takes one perturbation per step for the whole per-worker batch"),
        ({"sampa_lambda": 1.5}, r"sampa_lambda must be a probability in \[0, 1\], got 1.5"),
        ({"optimizer": "asam"}, "needs optimizer='sam'"),
        ({"precision": "fp16", "use_gpu": True}, "fp16 loss scaling"),
    ],
)
def test_trial_config_refuses_what_sampa_cannot_run(config, message):
    with pytest.raises(TrialConfigError, match=message):
        resolve_config({"optimizer": "sam", "sam_variant": "sampa", **config})


@pytest.mark.slow
def test_a_two_worker_ray_train_trial_trains_with_sampa_and_one_collective_per_step(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from samtune.trial.entry import train_loop_per_worker

    config = {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 4,
        "batch_size": 64,
        "workers": 2,
        "optimizer": "sam",
        "sam_variant": "sampa",
        "rho": 0.1,
        "lr": 0.05,
        "sharpness_measures": "",
    }
    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level="ERROR")
    try:
        result = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="sampa", storage_path=str(tmp_path)),
        ).fit()
    finally:
        ray.shutdown()
    epochs = result.metrics_dataframe.sort_values("epoch")
    assert list(epochs["epoch"]) == [1, 2, 3, 4]
    assert epochs["test_error"].iloc[-1] < epochs["test_error"].iloc[0]
    assert epochs["train_loss"].iloc[-1] < epochs["train_loss"].iloc[0]
    assert (epochs["allreduce_per_step"] == 1).all()
    assert epochs["m_plan"].iloc[-1] == (
        "m=64: SAMPa on 1 pair of workers, each pair on its own batch of 64, one gradient per worker"
    )

"""The training function: learning, exact resume, divergence, config errors, the sharpness hook,
and the multi-worker SAM step (per-worker, grouped, k-worker and classic perturbations) checked
against SAM computed by hand on the same examples."""

import gc
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from samtune.data.scenarios import build_scenario
from samtune.data.transforms import to_float
from samtune.trial.config import TrialConfigError, perturbation_plan, resolve_config
from samtune.trial.entry import fit
from samtune.trial.placement import distributed_backend, worker_resources

BASE = {"dataset": "digits", "model": "cnn", "epochs": 2, "batch_size": 64, "lr": 0.05, "sharpness_measures": ()}


def weights_after(config, **kw):
    box = {}
    metrics = fit(config, on_end=lambda m: box.update(state={k: v.clone() for k, v in m.state_dict().items()}), **kw)
    return metrics, box.get("state")


def test_fit_learns_digits_and_reports_every_metric():
    seen = []
    last = fit({**BASE, "epochs": 3, "optimizer": "sam"}, report=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    for key in (
        "train_loss",
        "train_acc_noisy",
        "train_acc_true",
        "train_error",
        "val_error",
        "val_loss",
        "test_error",
        "test_loss",
        "generalization_gap",
        "epoch_time_s",
        "samples_per_s",
        "train_time_s",
        "diverged",
    ):
        assert key in last, key
    assert last["test_error"] < 0.15
    assert last["diverged"] == 0
    assert last["generalization_gap"] == last["test_error"] - last["train_error"]
    assert "flipped_acc_noisy" not in last  # no label noise, nothing flipped
    assert seen[2]["train_time_s"] == pytest.approx(sum(m["epoch_time_s"] for m in seen))
    # The trial's own compute: its training epochs plus evaluation, cumulative.
    compute = [m["compute_time_s"] for m in seen]
    assert compute == sorted(compute) and all(c > t for c, t in zip(compute, (m["train_time_s"] for m in seen)))
    # How m was realised: one eps from the whole batch of the single worker.
    assert (last["m_effective"], last["m_workers"], last["m_groups_per_worker"], last["m_per_worker_batch"]) == (
        64,
        1,
        1,
        64,
    )
    assert last["m_plan"] == "m=64: one eps from the whole batch"
    # cosine schedule: after the last step of the last epoch the multiplier is cos(pi) -> 0
    assert seen[0]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 3)), rel=0.02)
    assert last["lr"] == pytest.approx(0.0, abs=1e-12)


def test_noisy_and_true_label_accuracy_separate_under_label_noise():
    # With 60% symmetric noise, a model that learns the true rule agrees with the noisy labels on
    # about 40% + 60%/9 of examples while matching the true labels far more often.
    last = fit({**BASE, "epochs": 4, "label_noise_rate": 0.6, "lr": 0.02})
    assert last["train_acc_true"] > last["train_acc_noisy"] + 0.2
    assert last["test_error"] < last["val_error"]  # clean test set vs noisy validation labels


def test_sam_with_rho_zero_trains_exactly_like_sgd():
    sgd, w_sgd = weights_after({**BASE, "optimizer": "sgd"})
    sam, w_sam = weights_after({**BASE, "optimizer": "sam", "rho": 0.0})
    for k in w_sgd:
        assert torch.equal(w_sgd[k], w_sam[k]), k
    assert sgd["test_error"] == sam["test_error"]


@pytest.mark.parametrize("every, measured", [(0, [3]), (2, [2, 3])])
def test_the_training_subset_is_evaluated_at_the_epochs_train_eval_every_names(every, measured):
    full, reduced = [], []
    _, w_full = weights_after({**BASE, "epochs": 3, "label_noise_rate": 0.4}, report=full.append)
    _, w_reduced = weights_after(
        {**BASE, "epochs": 3, "label_noise_rate": 0.4, "train_eval_every": every}, report=reduced.append
    )
    train_keys = ("train_error", "generalization_gap", "flipped_acc_noisy", "flipped_acc_true")
    assert [r["epoch"] for r in reduced if set(train_keys) <= set(r)] == measured
    assert not any(k in r for r in reduced if r["epoch"] not in measured for k in train_keys)
    # Evaluating less never changes the training, nor what is measured where it is measured.
    assert all(torch.equal(w_full[k], w_reduced[k]) for k in w_full)
    for r in reduced:
        same = full[r["epoch"] - 1]
        assert {k: r[k] for k in train_keys + ("test_error", "val_error") if k in r} == {
            k: same[k] for k in train_keys + ("test_error", "val_error") if k in r
        }


def test_same_seed_same_run_and_other_seed_differs():
    a, wa = weights_after({**BASE, "epochs": 1, "optimizer": "sam"})
    b, wb = weights_after({**BASE, "epochs": 1, "optimizer": "sam"})
    c, wc = weights_after({**BASE, "epochs": 1, "optimizer": "sam", "seed": 1})
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize(
    "config",
    [
        {**BASE, "epochs": 4, "optimizer": "sam", "m": 16, "label_noise_rate": 0.2},
        # ASAM around AdamW, randomized SAM steps (variant state), constant LR, one epoch done
        {
            **BASE,
            "model": "mlp",
            "epochs": 3,
            "optimizer": "asam",
            "base_optimizer": "adamw",
            "lr": 1e-3,
            "rho": 0.5,
            "sam_variant": "rst",
            "lr_schedule": "constant",
            "data_subset": 600,
        },
    ],
    ids=["sam-groups", "asam-adamw-rst"],
)
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, config):
    full, w_full = weights_after(config)
    crash_at = config["epochs"] // 2

    def crash(metrics):
        if metrics["epoch"] == crash_at:
            raise Crash

    with pytest.raises(Crash):
        fit(config, report=crash, checkpoint_dir=tmp_path)
    epochs = []
    resumed, w_resumed = weights_after(config, report=lambda m: epochs.append(m["epoch"]), checkpoint_dir=tmp_path)
    assert epochs == list(range(crash_at + 1, config["epochs"] + 1))  # nothing repeated or skipped
    for k in w_full:
        assert torch.equal(w_full[k], w_resumed[k]), k
    for key in ("train_loss", "val_error", "test_error", "train_acc_true"):
        assert resumed[key] == full[key]


def test_divergence_is_a_bad_result_not_a_crash(tmp_path):
    seen = []
    config = {**BASE, "epochs": 5, "optimizer": "sam", "rho": 5.0, "lr": 1e4}
    last = fit(config, report=seen.append, checkpoint_dir=tmp_path)
    assert last["diverged"] == 1
    assert last["val_error"] == 1.0 and last["test_error"] == 1.0
    # Whatever metric the sweep optimises, the diverged result carries it, at its worst.
    from samtune.contract.metrics import OPTIMISABLE

    assert set(OPTIMISABLE) <= set(last)
    assert last["train_error"] == 1.0 and last["train_acc_noisy"] == 0.0
    assert last["val_loss"] == last["train_loss"] == BASE.get("divergence_loss", 1e3)
    assert len(seen) < 5  # stopped early
    assert all(math.isfinite(v) for m in seen for v in m.values() if isinstance(v, float))
    # Resuming a diverged run does not train again: it ends with the same bad result.
    again = []
    assert fit(config, report=again.append, checkpoint_dir=tmp_path) == last and again == []


@pytest.mark.parametrize(
    "change, message",
    [
        ({"m": 24}, "m=24 does not divide the per-worker batch 64"),
        ({"workers": 3}, "does not split evenly over workers=3"),
        ({"optimizer": "adam"}, "optimizer='adam' is not one of"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"rho": -0.1}, "rho must be >= 0"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"precision": "fp16"}, "precision='fp16' needs use_gpu=True"),
        ({"precision": "int8"}, "precision='int8' is not one of"),
        ({"backend": "mpi"}, "backend='mpi' is not one of"),
        ({"optimizer": "sam", "sam_variant": "lookahead"}, "sam_variant='lookahead'"),
        ({"optimizer": "sam", "sam_variant": "looksam", "m": 16}, "does not combine with m=16"),
        ({"workers": 4, "m": 48}, "not k x 16 with k dividing workers=4"),
        ({"workers": 2, "m": 16, "sync_perturbation": True}, "sync_perturbation=True means m = the global batch 64"),
        ({"sharpness_settings": "rho=0.1"}, "sharpness_settings must be a dict"),
    ],
)
def test_impossible_settings_are_named(change, message):
    with pytest.raises(TrialConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_config({**BASE, **change})


def test_use_gpu_without_cuda_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrialConfigError, match="use_gpu=True but CUDA is not available"):
        fit({**BASE, "use_gpu": True})


@pytest.mark.parametrize(
    "batch, workers, m, sync, expected",
    [
        # (m, per-worker batch, workers, eps per worker, workers sharing one eps)
        (64, 1, None, False, (64, 64, 1, 1, 1)),
        (64, 2, None, False, (32, 32, 2, 1, 1)),  # per-worker: each worker's own batch
        (64, 2, 8, False, (8, 32, 2, 4, 1)),  # groups of 8 inside each worker
        (64, 2, 64, False, (64, 32, 2, 1, 2)),  # the global batch: classic SAM
        (64, 4, 32, False, (32, 16, 4, 1, 2)),  # pairs of workers
        (64, 4, None, True, (64, 16, 4, 1, 4)),  # sync_perturbation
    ],
)
def test_perturbation_plan_follows_m(batch, workers, m, sync, expected):
    plan = perturbation_plan(
        resolve_config({**BASE, "batch_size": batch, "workers": workers, "m": m, "sync_perturbation": sync})
    )
    assert (plan.m, plan.per_worker_batch, plan.workers, plan.groups_per_worker, plan.workers_per_eps) == expected
    assert plan.sync_all == (workers > 1 and expected[4] == workers)
    assert f"m={expected[0]}" in plan.describe()


def test_fit_refuses_several_workers_in_process():
    with pytest.raises(TrialConfigError, match="workers must be 1"):
        fit({**BASE, "workers": 2})


def test_worker_resources_fit_beside_the_trial_and_refuse_impossible_requests():
    cfg = resolve_config({**BASE, "workers": 2})
    # The trial's own process holds no CPU (it sits on the head node): two workers on 2 cores,
    # or on two 1-CPU nodes, get a whole CPU each; where it holds a token share, 0.9 each.
    assert worker_resources(cfg, cluster_cpus=2.0) == {"CPU": 1.0}
    assert worker_resources(cfg, cluster_cpus=2.0, nodes=[{"CPU": 1.0}] * 2) == {"CPU": 1.0}
    assert worker_resources(cfg, cluster_cpus=2.0, driver_cpu=0.01) == {"CPU": 0.9}
    assert worker_resources(cfg, cluster_cpus=16.0) == {"CPU": 1.0}
    assert worker_resources(resolve_config({**BASE, "workers": 4}), cluster_cpus=2.0) == {"CPU": 0.5}
    with pytest.raises(
        TrialConfigError,
        match=r"need 4 CPUs \(and 0.01 for the trial's driver\), but the "
        "Ray cluster has 2",
    ):
        worker_resources(
            resolve_config({**BASE, "workers": 2, "cpus_per_worker": 2.0}), cluster_cpus=2.0, driver_cpu=0.01
        )
    with pytest.raises(TrialConfigError, match=r"need 4 CPUs, but the Ray cluster has 2"):
        worker_resources(resolve_config({**BASE, "workers": 2, "cpus_per_worker": 2.0}), cluster_cpus=2.0)
    assert distributed_backend(cfg, {"CPU": 0.5}) == "gloo"


def test_gpu_workers_get_a_gpu_each_or_share_one_over_gloo():
    gpu = resolve_config({**BASE, "workers": 2, "use_gpu": True})
    own = worker_resources(gpu, cluster_cpus=8.0, cluster_gpus=4.0)
    assert own == {"CPU": 1.0, "GPU": 1.0} and distributed_backend(gpu, own) == "nccl"
    shared = worker_resources(gpu, cluster_cpus=8.0, cluster_gpus=1.0)
    assert shared == {"CPU": 1.0, "GPU": 0.5} and distributed_backend(gpu, shared) == "gloo"
    with pytest.raises(TrialConfigError, match="use_gpu=True but the Ray cluster has no GPU"):
        worker_resources(gpu, cluster_cpus=8.0, cluster_gpus=0.0)
    with pytest.raises(TrialConfigError, match="need 2 GPUs, but the Ray cluster has 1"):
        worker_resources(
            resolve_config({**BASE, "workers": 2, "use_gpu": True, "gpus_per_worker": 1.0}),
            cluster_cpus=8.0,
            cluster_gpus=1.0,
        )


def test_compiled_model_trains_like_the_plain_one():
    # The "eager" backend runs the traced graph op by op, so the numbers must not move at all.
    config = {**BASE, "model": "mlp", "epochs": 1, "optimizer": "sam", "m": 16, "data_subset": 400}
    _, plain = weights_after(config)
    _, compiled = weights_after({**config, "compile": True, "compile_backend": "eager"})
    for k in plain:
        assert torch.equal(plain[k], compiled[k]), k


def test_bf16_autocast_trains_and_rounds_differently():
    config = {**BASE, "model": "mlp", "epochs": 2, "optimizer": "sam", "data_subset": 600}
    _, fp32 = weights_after(config)
    last, bf16 = weights_after({**config, "precision": "bf16"})
    assert last["diverged"] == 0 and last["test_error"] < 0.3
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)  # autocast really ran in bf16


def test_sharpness_is_measured_on_the_documented_subset_without_disturbing_training():
    from samtune.sharpness.measures import measure_sharpness

    config = {
        **BASE,
        "model": "mlp",
        "epochs": 2,
        "optimizer": "sam",
        "data_subset": 600,
        "label_noise_rate": 0.3,
        "sharpness_every": 1,
        "sharpness_subset": 128,
        "sharpness_measures": ("m_sharpness", "avg_sharpness"),
        "sharpness_settings": {"m_sharpness": {"rho": 0.1}},
    }
    seen = []
    box = {}
    last = fit(config, report=seen.append, on_end=lambda m: box.update(model=m))
    assert all("sharpness/m_sharpness" in m and "sharpness/avg_sharpness" in m for m in seen)
    assert last["sharpness/m_sharpness/rho"] == 0.1
    # Training is the same with or without the measurements in between.
    _, unmeasured = weights_after({**config, "sharpness_measures": ()})
    model = box["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, unmeasured[k]), k
    # The reported value is measure_sharpness on the first 128 examples of the permutation
    # seeded with seed + 7919, with the noisy labels trained on.
    sc = build_scenario(resolve_config(config))
    idx = torch.randperm(len(sc.train_y), generator=torch.Generator().manual_seed(0 + 7919))[:128]
    x, y = to_float(sc.train_x[idx], sc.mean, sc.std), sc.train_y[idx]
    assert not torch.equal(y, sc.train_y_true[idx])
    again = measure_sharpness(model, F.cross_entropy, x, y, measures=("m_sharpness",), seed=0, m_sharpness={"rho": 0.1})
    assert last["sharpness/m_sharpness"] == pytest.approx(again["sharpness/m_sharpness"], rel=1e-6)


def test_train_error_losses_and_memorisation_are_eval_mode_measurements_of_the_final_model():
    config = {**BASE, "epochs": 2, "optimizer": "sam", "label_noise_rate": 0.4}
    box = {}
    last = fit(config, on_end=lambda m: box.update(model=m))
    model = box["model"].eval()
    sc = build_scenario(resolve_config(config))

    def logits_of(x):
        with torch.no_grad():
            return model(to_float(x, sc.mean, sc.std))

    # The fixed subset: the first 1,024 indices of the permutation seeded with seed + 7919.
    idx = torch.randperm(len(sc.train_y), generator=torch.Generator().manual_seed(0 + 7919))[:1024]
    assert len(sc.train_y) > 1024
    pred, noisy, true = logits_of(sc.train_x[idx]).argmax(1), sc.train_y[idx], sc.train_y_true[idx]
    assert last["train_error"] == pytest.approx(float((pred != noisy).double().mean()), abs=1e-12)
    assert last["generalization_gap"] == last["test_error"] - last["train_error"]
    flipped = noisy != true
    assert 300 < int(flipped.sum()) < 520  # about 40% of 1,024
    assert last["flipped_acc_noisy"] == pytest.approx(float((pred == noisy)[flipped].double().mean()), abs=1e-12)
    assert last["flipped_acc_true"] == pytest.approx(float((pred == true)[flipped].double().mean()), abs=1e-12)
    for split in ("val", "test"):
        x, y = getattr(sc, f"{split}_x"), getattr(sc, f"{split}_y")
        logits = logits_of(x)
        assert last[f"{split}_error"] == pytest.approx(float((logits.argmax(1) != y).double().mean()), abs=1e-12)
        assert last[f"{split}_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def _save_source(path, num_classes=5):
    from samtune.models.zoo import build_model

    torch.manual_seed(5)
    net = build_model("cnn", num_classes, (1, 8, 8))
    torch.save(net.state_dict(), path)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_backbone_lr_scale_scales_the_pretrained_layers_step(tmp_path):
    source = _save_source(tmp_path / "w.pt")
    # One step (64 examples, batch 64) of SAM without momentum or weight decay: the update is
    # -lr x gradient at w + eps, and the gradient does not depend on the learning rate, so the
    # backbone's step at backbone_lr_scale s is exactly s times its step at scale 1.
    config = {
        **BASE,
        "dataset": "digits[5-9]",
        "scenario": "finetune",
        "finetune_source": str(tmp_path / "w.pt"),
        "epochs": 1,
        "data_subset": 64,
        "val_fraction": 0.0,
        "batch_size": 64,
        "optimizer": "sam",
        "lr": 0.5,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
    }
    full, w_full = weights_after(config)
    slow, w_slow = weights_after({**config, "backbone_lr_scale": 0.1})
    probe, w_probe = weights_after({**config, "backbone_lr_scale": 0.0})
    assert (full["lr"], full["lr_backbone"]) == (0.5, 0.5)
    assert slow["lr"] == 0.5 and slow["lr_backbone"] == pytest.approx(0.05)
    assert probe["lr_backbone"] == 0.0
    from samtune.models.zoo import build_model

    names = {n for n, _ in build_model("cnn", 5, (1, 8, 8)).named_parameters()}
    backbone = sorted(n for n in names if not n.startswith("head."))
    moved = 0.0
    for k in backbone:
        step_full, step_slow = w_full[k] - source[k], w_slow[k] - source[k]
        torch.testing.assert_close(step_slow, 0.1 * step_full, rtol=1e-4, atol=1e-7)
        assert torch.equal(w_probe[k], source[k]), k  # scale 0: a linear probe, backbone untouched
        moved = max(moved, float(step_full.abs().max()))
    assert moved > 1e-3
    for k in ("head.weight", "head.bias"):  # the head takes the same step at either scale
        torch.testing.assert_close(w_slow[k], w_full[k], rtol=1e-6, atol=1e-7)
    # (The probe's head step differs: SAM then perturbs only the head, the parameters it trains.)
    assert not torch.equal(w_probe["head.weight"], w_full["head.weight"])


def test_worker_resources_check_the_largest_node_not_only_the_totals(monkeypatch):
    three = resolve_config({**BASE, "workers": 2, "cpus_per_worker": 3.0})
    with pytest.raises(
        TrialConfigError, match="one training worker needs 3 CPU on a single node, but the largest node has 2 CPU"
    ):
        worker_resources(three, cluster_cpus=8.0, nodes=[{"CPU": 2.0}] * 4)  # 8 CPUs, none holds 3
    assert worker_resources(three, cluster_cpus=8.0, nodes=[{"CPU": 4.0}] * 2) == {"CPU": 3.0}
    four = resolve_config({**BASE, "workers": 4, "cpus_per_worker": 1.5})
    assert worker_resources(four, cluster_cpus=8.0, nodes=[{"CPU": 2.0}] * 4) == {"CPU": 1.5}
    with pytest.raises(
        TrialConfigError,
        match=r"4 workers of 1.5 CPU each do not fit: the Ray cluster's 3 "
        r"node\(s\) hold 3 such workers",
    ):
        worker_resources(four, cluster_cpus=7.5, nodes=[{"CPU": 2.5}] * 3)  # the totals would fit
    gpu = resolve_config({**BASE, "workers": 3, "batch_size": 63, "use_gpu": True})
    # Two one-GPU nodes and 3 workers: a 0.66 share each, and no GPU holds two of them.
    with pytest.raises(TrialConfigError, match=r"3 workers of 1 CPU \+ 0.66 GPU each do not fit: .* hold 2 "):
        worker_resources(gpu, cluster_cpus=16.0, cluster_gpus=2.0, nodes=[{"CPU": 8.0, "GPU": 1.0}] * 2)
    with pytest.raises(TrialConfigError, match="needs 1 CPU \\+ 1 GPU on a single node"):
        worker_resources(
            resolve_config({**BASE, "workers": 2, "use_gpu": True}),
            cluster_cpus=9.0,
            cluster_gpus=2.0,
            nodes=[{"CPU": 8.0, "GPU": 0.0}, {"CPU": 0.5, "GPU": 2.0}],
        )
    # Without explicit figures, the connected cluster's alive nodes (ray.nodes()) are checked.
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 10.0})
    monkeypatch.setattr(
        ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 8.0}}]
    )
    with pytest.raises(TrialConfigError, match="largest node has 2 CPU"):
        worker_resources(three)


def test_grad_scaler_and_clipping_through_both_sam_passes_match_the_unscaled_step():
    from samtune.data.load import load_dataset
    from samtune.models.zoo import build_model
    from samtune.optim.sam import SAM
    from samtune.optim.step import sam_step

    ds = load_dataset("digits")
    x, y = to_float(ds.train_x[:192], ds.mean, ds.std), ds.train_y[:192]

    def run(scaler=None, m=None, clip=0.5, dtype=None):
        torch.manual_seed(0)
        model = build_model("mlp", 10, (1, 8, 8), "none")
        opt = SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        norms = []
        for s in range(3):
            xb, yb = x[64 * s : 64 * (s + 1)], y[64 * s : 64 * (s + 1)]
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                sam_step(model, F.cross_entropy, xb, yb, opt, m=m, max_grad_norm=clip, scaler=scaler)
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        return [p.detach().clone() for p in model.parameters()], norms

    for m in (None, 16):  # whole-batch eps and m-sharpness groups
        reference, norms = run(m=m)
        assert min(norms) < 0.5 + 1e-6  # what the base optimizer stepped with was clipped
        unclipped, raw_norms = run(m=m, clip=None)
        assert min(raw_norms) > 0.5  # ... from gradients that were larger
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        scaled, _ = run(scaler, m=m)
        # A power-of-two loss scale is exact in float32, eps is normalised, the gradient is
        # unscaled once before clipping: the same update as without scaling.
        for a, b, _c in zip(reference, scaled, unclipped):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(a, c, rtol=1e-5, atol=1e-6) for a, c in zip(reference, unclipped))
        assert scaler.get_scale() == 2.0**12  # no overflow, no skipped step
    # fp16 autocast on CPU, where the build supports it: the scaled steps stay near fp32's.
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(4, 4)(torch.randn(2, 4))
    except RuntimeError:
        return
    half, _ = run(torch.amp.GradScaler("cpu", init_scale=2.0**12), dtype=torch.float16)
    reference, _ = run()
    for a, b in zip(reference, half):
        torch.testing.assert_close(b, a, rtol=0, atol=5e-3)


# ------------------------------------------------------------------------------ multi-worker
# No BatchNorm, no momentum, constant LR: one SAM step is w -= lr * mean over groups of the
# gradient at w + eps_group, so the by-hand reference below is the whole algorithm.
STEPS = {
    "dataset": "digits",
    "model": "mlp",
    "norm": "none",
    "epochs": 1,
    "batch_size": 400,
    "lr": 0.1,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "optimizer": "sam",
    "rho": 0.5,
    "lr_schedule": "constant",
    "sharpness_measures": (),
    "seed": 3,
}


def sam_by_hand(config, world, m):
    """SAM steps where each group of m examples, formed as the workers would form them (inside a
    worker's batch for m <= per-worker batch, else the union of m / per-worker consecutive
    workers' batches), gets its own eps; the update averages the groups' gradients."""
    cfg = resolve_config({**config, "workers": world})
    sc = build_scenario(cfg)
    torch.manual_seed(cfg["seed"])
    model = sc.build_model(cfg["model"], cfg["norm"])
    params = list(model.parameters())
    n, local = len(sc.train_y), cfg["batch_size"] // world
    steps = (n // world) // local
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] * 100_003 + 1))
    shards = [order[r::world] for r in range(world)]
    for s in range(steps):
        batches = [shard[s * local : (s + 1) * local] for shard in shards]
        if m <= local:
            groups = [b[j : j + m] for b in batches for j in range(0, local, m)]
        else:
            k = m // local
            groups = [torch.cat(batches[i : i + k]) for i in range(0, world, k)]
        total = [torch.zeros_like(p) for p in params]
        for idx in groups:
            x, y = to_float(sc.train_x[idx], sc.mean, sc.std), sc.train_y[idx]
            g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            scale = cfg["rho"] / torch.sqrt(sum((gi**2).sum() for gi in g))
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(scale * gi)
            h = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.sub_(scale * gi)
                for t, hi in zip(total, h):
                    t.add_(hi / len(groups))
        with torch.no_grad():
            for p, t in zip(params, total):
                p.sub_(cfg["lr"] * t)
    return {k: v.detach() for k, v in model.state_dict().items()}, steps


# All-reduce sums the workers' gradients in another order than the reference does: a few float32
# ulps per step (measured up to 2.3e-6 on 4 gloo ranks). The settings told apart here (per-worker,
# paired, classic eps) land 3e-4 to 1e-3 apart after these steps, 30x and more above this bound.
SAME_WEIGHTS = {"rtol": 1e-5, "atol": 1e-5}


def assert_same_weights(state, ref):
    for k in ref:
        torch.testing.assert_close(state[k], ref[k], **SAME_WEIGHTS)


def distance(state, ref):
    return max((state[k] - ref[k]).abs().max().item() for k in ref)


def differ_somewhere(state, ref):
    return not all(torch.allclose(state[k], ref[k], **SAME_WEIGHTS) for k in ref)


def test_one_worker_steps_match_sam_by_hand():
    _, state = weights_after(STEPS)
    ref, steps = sam_by_hand(STEPS, 1, 400)
    assert steps == 3
    assert_same_weights(state, ref)


@pytest.mark.parametrize("m_vmap", [None, True, False], ids=["default", "vmap", "one-group-at-a-time"])
def test_one_worker_groups_match_sam_by_hand(m_vmap):
    # m_vmap picks how the groups run (one batched pass, or one after another), never what they
    # compute: every route lands on the weights of SAM by hand.
    _, state = weights_after({**STEPS, "m": 100, "m_vmap": m_vmap})
    assert_same_weights(state, sam_by_hand(STEPS, 1, 100)[0])


def test_m_vmap_true_runs_the_groups_in_one_batched_pass(monkeypatch):
    import samtune.optim.msharpness as msharpness

    calls = []
    real = msharpness.vmap
    monkeypatch.setattr(msharpness, "vmap", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    weights_after({**STEPS, "m": 100, "m_vmap": False})
    assert calls == []  # on this CPU the groups run one at a time unless asked
    weights_after({**STEPS, "m": 100, "m_vmap": True})
    assert calls  # asked: vmap, not the loop


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def _record_sam_passes(records):
    """Patch SAM (in this worker process) to record every step's first-pass gradients, second-pass
    gradients and parameters after the update, flattened."""
    from samtune.optim.sam import SAM

    first, second = SAM.first_step, SAM.second_step

    def first_step(self, *a, **kw):
        records.append({"first": _flat(p.grad for g in self.param_groups for p in g["params"])})
        return first(self, *a, **kw)

    def second_step(self, *a, **kw):
        if not records or "second" in records[-1]:
            records.append({})
        records[-1]["second"] = _flat(p.grad for g in self.param_groups for p in g["params"])
        out = second(self, *a, **kw)
        records[-1]["params"] = _flat(p for g in self.param_groups for p in g["params"])
        return out

    SAM.first_step, SAM.second_step = first_step, second_step


def probe_workers(config):
    """Run in every worker: each named run of the training loop, saving this rank's per-step
    records and final weights to config["out"]."""
    import torch.distributed as dist

    from samtune.trial.entry import train as _train
    from samtune.trial.entry import train_loop_per_worker
    from samtune.trial.session import LocalSession

    records = []
    _record_sam_passes(records)
    rank = dist.get_rank()
    for name, run in config["runs"].items():
        records.clear()
        box, seen = {}, []
        _train(run, LocalSession(seen.append, None), on_end=lambda m, box=box: box.update(state=m.state_dict()))
        torch.save(
            {"records": list(records), "state": box["state"], "metrics": seen},
            os.path.join(config["out"], f"{name}-{rank}.pt"),
        )
    if config.get("public"):  # and the public entry point, reporting its checkpoint to Ray
        train_loop_per_worker(config["public"])


def load_probe(out, name, world):
    return [torch.load(os.path.join(out, f"{name}-{r}.pt"), weights_only=True) for r in range(world)]


def check_replicas(ranks, first_pass_shared):
    """Parameters agree on every worker after every step; second-pass gradients are all-reduced;
    first-pass gradients are each worker's own unless the perturbation is shared (None: not
    recorded)."""
    steps = len(ranks[0]["records"])
    assert steps == 3
    for s in range(steps):
        recs = [r["records"][s] for r in ranks]
        for other in recs[1:]:
            assert torch.equal(recs[0]["params"], other["params"])
            assert torch.equal(recs[0]["second"], other["second"])
            if first_pass_shared is None:
                continue
            if first_pass_shared:
                torch.testing.assert_close(recs[0]["first"], other["first"], rtol=1e-6, atol=1e-7)
            else:
                assert (recs[0]["first"] - other["first"]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    import ray.cloudpickle

    # The probe functions live in this test module, which Ray workers cannot import: ship them.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_resource_share_is_the_held_fraction_of_the_machine():
    from samtune.trial.placement import resource_share

    assert resource_share({"CPU": 1.0}, {"CPU": 4.0}, "CPU") == 0.25
    assert resource_share({"CPU": 8.0}, {"CPU": 4.0}, "CPU") == 1.0
    # A GPU's memory is its own: half a GPU plans on half of it, a whole one or more on all.
    assert resource_share({"GPU": 0.5, "CPU": 1.0}, {"GPU": 8.0, "CPU": 64.0}, "GPU") == 0.5
    assert resource_share({"GPU": 2.0}, {"GPU": 8.0}, "GPU") == 1.0
    assert resource_share({}, {"CPU": 4.0}, "CPU") == 1.0
    assert resource_share({"CPU": 1.0}, {}, "CPU") == 1.0


@pytest.mark.slow
def test_a_ray_task_plans_on_its_share_of_the_machine_memory(ray_cluster):
    """Inside Ray a trial counts on the fraction of the node's CPUs it holds (2 here), so trials
    measuring side by side do not each plan on all the free memory; the driver plans on all."""
    from samtune.trial.placement import memory_share

    share = ray_cluster.remote(lambda: memory_share(torch.device("cpu")))
    assert ray_cluster.get(share.options(num_cpus=1).remote()) == 0.5
    assert ray_cluster.get(share.options(num_cpus=2).remote()) == 1.0
    assert memory_share(torch.device("cpu")) == 1.0


@pytest.mark.slow
def test_two_gloo_workers_per_worker_grouped_and_classic_sam(ray_cluster, tmp_path):
    """Under TorchTrainer with 2 gloo workers: per-worker eps (first pass inside no_sync), groups
    of m inside each worker, and m = global batch (classic SAM), each against SAM by hand."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    runs = {
        "per_worker": {**STEPS, "workers": 2},
        "groups": {**STEPS, "workers": 2, "m": 50},
        "classic": {**STEPS, "workers": 2, "m": 400},
    }
    result = TorchTrainer(
        probe_workers,
        train_loop_config={"runs": runs, "out": str(tmp_path), "public": runs["per_worker"]},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="probe", storage_path=str(tmp_path / "ray")),
    ).fit()

    per_worker = load_probe(tmp_path, "per_worker", 2)
    check_replicas(per_worker, first_pass_shared=False)
    assert_same_weights(per_worker[0]["state"], sam_by_hand(STEPS, 2, 200)[0])
    assert per_worker[0]["metrics"][-1]["m_effective"] == 200
    assert per_worker[0]["metrics"][-1]["m_workers"] == 1
    # Communication, counted by the trainer: per-worker eps needs one gradient all-reduce per
    # step (the second pass's), groups one, classic SAM two (both passes' gradients).
    assert per_worker[0]["metrics"][-1]["allreduce_per_step"] == 1

    groups = load_probe(tmp_path, "groups", 2)
    check_replicas(groups, first_pass_shared=None)  # groups take their first passes outside DDP
    assert_same_weights(groups[0]["state"], sam_by_hand(STEPS, 2, 50)[0])
    assert torch.equal(_flat(groups[0]["state"].values()), _flat(groups[1]["state"].values()))
    assert groups[0]["metrics"][-1]["allreduce_per_step"] == 1

    classic = load_probe(tmp_path, "classic", 2)
    check_replicas(classic, first_pass_shared=True)
    _, one_process = weights_after(STEPS)  # the same global batches in one process, m = 400
    assert_same_weights(classic[0]["state"], one_process)
    assert classic[0]["metrics"][-1]["m_workers"] == 2
    assert classic[0]["metrics"][-1]["allreduce_per_step"] == 2
    # ... and per-worker eps is not classic SAM: its update lands elsewhere.
    assert differ_somewhere(per_worker[0]["state"], one_process)

    # train_loop_per_worker itself: its reported checkpoint holds the per-worker SAM weights.
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(os.path.join(folder, "trial.pt"), weights_only=True)
    assert_same_weights(saved["model"], per_worker[0]["state"])
    assert saved["epoch"] == 1 and result.metrics["m_effective"] == 200


def _four_rank_worker(rank, out, init):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=4)
    try:
        probe_workers({"runs": {"pairs": {**STEPS, "workers": 4, "m": 200}}, "out": out})
    finally:
        gc.collect()  # no DDP module may outlive its process group (gloo aborts at teardown)
        dist.destroy_process_group()


@pytest.mark.slow
def test_four_workers_share_each_eps_in_pairs(tmp_path):
    """m = 2 x per-worker batch on 4 workers (a plain torch.distributed job, as under torchrun):
    ranks {0,1} and {2,3} each all-reduce their first gradients within the pair."""
    import torch.multiprocessing as mp

    mp.spawn(_four_rank_worker, args=(str(tmp_path), f"file://{tmp_path}/store"), nprocs=4)
    ranks = load_probe(tmp_path, "pairs", 4)
    # Four ranks add a subgroup all-reduce to the reordered sums, and rho = 0.5 amplifies those
    # ulps through the normalised ascent step (runs measured 2e-6 to 1.2e-5 off the reference).
    # The claim tested: the weights sit at least 10x closer to paired eps than to per-worker eps
    # (m = 100) or to one eps for all four ranks (m = 400).
    state = ranks[0]["state"]
    paired, per_worker, shared = (distance(state, sam_by_hand(STEPS, 4, m)[0]) for m in (200, 100, 400))
    assert paired < 0.1 * min(per_worker, shared), (paired, per_worker, shared)
    for s in range(3):
        first = [r["records"][s]["first"] for r in ranks]
        torch.testing.assert_close(first[0], first[1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(first[2], first[3], rtol=1e-6, atol=1e-7)
        assert (first[0] - first[2]).abs().max() > 1e-3
        assert all(torch.equal(ranks[0]["records"][s]["params"], r["records"][s]["params"]) for r in ranks)
    assert ranks[0]["metrics"][-1]["m_workers"] == 2


FINETUNE_RANKS = {
    "dataset": "digits[5-9]",
    "scenario": "finetune",
    "finetune_source": "digits[0-4]",
    "model": "cnn",
    "epochs": 2,
    "batch_size": 64,
    "workers": 2,
    "optimizer": "sam",
    "pretrain_epochs": 2,
    "label_noise_rate": 0.2,
    "sharpness_measures": (),
}


def _finetune_rank_worker(rank, out, init, cache):
    import torch.distributed as dist

    from samtune.trial.entry import train as _train
    from samtune.trial.session import LocalSession

    os.environ["SAMTUNE_CACHE_DIR"] = cache
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        seen, box = [], {}
        _train(
            FINETUNE_RANKS,
            LocalSession(seen.append, None),
            on_end=lambda m: box.update(state={k: v.clone() for k, v in m.state_dict().items()}),
        )
        torch.save({"metrics": seen, "state": box["state"]}, os.path.join(out, f"finetune-{rank}.pt"))
    finally:
        gc.collect()  # no DDP module may outlive its process group (gloo aborts at teardown)
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_finetune_from_a_dataset_source_pretrained_inside_the_workers(tmp_path):
    """Every rank of a 2-worker finetuning trial resolves finetune_source='digits[0-4]' itself:
    the source is pretrained once (the other rank waits on the cache's file lock, in no
    collective), and the BatchNorm statistics are rank 0's on both ranks when evaluated."""
    import torch.multiprocessing as mp

    cache = tmp_path / "cache"
    mp.spawn(_finetune_rank_worker, args=(str(tmp_path), f"file://{tmp_path}/store", str(cache)), nprocs=2)
    assert len(list((cache / "pretrained").glob("*.pt"))) == 1
    ranks = [torch.load(tmp_path / f"finetune-{r}.pt", weights_only=True) for r in range(2)]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
    assert ranks[0]["metrics"] == [
        {
            **m,
            "epoch_time_s": ranks[0]["metrics"][i]["epoch_time_s"],
            "samples_per_s": ranks[0]["metrics"][i]["samples_per_s"],
            "train_time_s": ranks[0]["metrics"][i]["train_time_s"],
            "compute_time_s": ranks[0]["metrics"][i]["compute_time_s"],
        }
        for i, m in enumerate(ranks[1]["metrics"])
    ]
    last = ranks[0]["metrics"][-1]
    assert last["m_workers"] == 1 and last["m_per_worker_batch"] == 32 and "per-worker eps" in last["m_plan"]
    assert last["test_error"] < 0.2 and last["lr_backbone"] == last["lr"]
    assert last["generalization_gap"] == last["test_error"] - last["train_error"]


# ------------------------------------------------------------------------------ Tune
def _recording_asha(stop_first_after=None):
    """An ASHA scheduler that records every result it is given (epoch per trial) and can stop
    the first trial early, as ASHA does to a bad trial."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        seen: dict = {}

        def on_trial_result(self, tune_controller, trial, result):
            RecordingASHA.seen.setdefault(trial.trial_id, []).append(result["epoch"])
            decision = super().on_trial_result(tune_controller, trial, result)
            if stop_first_after and len(RecordingASHA.seen) == 1 and result["epoch"] >= stop_first_after:
                return TrialScheduler.STOP
            return decision

    return RecordingASHA(time_attr="epoch", max_t=3, grace_period=3)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_asha_sees_every_epoch_through_run_trial(ray_cluster, tmp_path, workers):
    """Every epoch reaches the scheduler; with 2 workers the first trial is stopped after one epoch
    and the next trial still gets its worker group (the stopped one's resources were freed)."""
    from ray import tune

    from samtune.trial.ray_trial import run_trial

    config = {
        **BASE,
        "epochs": 3,
        "workers": workers,
        "model": "mlp",
        "batch_size": 128,
        "optimizer": "sam",
        "seed": tune.grid_search([0, 1] if workers == 2 else [0]),
    }
    scheduler = _recording_asha(stop_first_after=1 if workers == 2 else None)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": 1}),
        param_space=config,
        tune_config=tune.TuneConfig(metric="val_error", mode="min", scheduler=scheduler, max_concurrent_trials=1),
        run_config=tune.RunConfig(name=f"w{workers}", storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors
    seen = list(type(scheduler).seen.values())
    if workers == 1:
        assert seen == [[1, 2, 3]]
    else:
        assert seen == [[1], [1, 2, 3]]
    last = grid.get_best_result(metric="epoch", mode="max")
    history = last.metrics_dataframe
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["test_error"].iloc[-1] < 0.3
    assert set(history["m_workers"]) == {1} and set(history["m_effective"]) == {128 // workers}


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_resumed_trial_falls_back_to_its_newest_readable_checkpoint(damage, tmp_path, capsys):
    """The newest checkpoint deleted or damaged, an older one intact: the trial resumes from the
    older one (and says so) instead of failing."""
    import shutil
    import types

    from ray.train import Checkpoint

    from samtune.trial.session import RaySession

    trial_dir = tmp_path / "trial_0"
    for epoch in range(3):
        folder = trial_dir / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        torch.save({"epoch": epoch}, folder / "trial.pt")
    newest = trial_dir / "checkpoint_000002"
    if damage == "deleted":
        shutil.rmtree(newest)
    else:
        (newest / "trial.pt").write_bytes((newest / "trial.pt").read_bytes()[:20])
    tune = types.SimpleNamespace(__name__="ray.tune", get_checkpoint=lambda: Checkpoint(str(newest)))
    assert RaySession(tune).load() == {"epoch": 1}
    assert f"resuming from {trial_dir / 'checkpoint_000001'}" in capsys.readouterr().err


def test_a_trial_whose_checkpoints_are_all_unreadable_still_fails(tmp_path):
    import types

    from ray.train import Checkpoint

    from samtune.trial.session import RaySession

    newest = tmp_path / "trial_0" / "checkpoint_000001"
    newest.mkdir(parents=True)
    (newest / "trial.pt").write_text("not a checkpoint")
    tune = types.SimpleNamespace(__name__="ray.tune", get_checkpoint=lambda: Checkpoint(str(newest)))
    with pytest.raises(Exception):  # noqa: B017  torch's own error for a damaged file
        RaySession(tune).load()

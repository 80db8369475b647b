"""Label noise, splits and the scenarios built from a trial config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from samtune.data.load import load_dataset
from samtune.data.noise import apply_label_noise, asymmetric_class_map
from samtune.data.scenarios import build_scenario
from samtune.models.heads import FrozenStatsBatchNorm2d, param_groups
from samtune.models.weights import load_backbone, read_state_dict, resolve_source
from samtune.models.zoo import build_model


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.0, 0.13, 0.4, 1.0])
def test_label_noise_flips_exactly_round_rate_n_labels(kind, rate):
    labels = torch.arange(1001) % 7
    noisy, flipped = apply_label_noise(labels, rate, 7, kind=kind, seed=3)
    changed = (noisy != labels).nonzero().flatten()
    assert len(changed) == round(rate * 1001)
    assert torch.equal(changed, flipped)
    assert noisy.dtype == torch.int64 and int(noisy.min()) >= 0 and int(noisy.max()) < 7
    if kind == "pairflip":
        assert torch.equal(noisy[flipped], (labels[flipped] + 1) % 7)


def test_symmetric_noise_never_keeps_the_true_label_and_covers_other_classes():
    labels = torch.zeros(6000, dtype=torch.int64)
    noisy, flipped = apply_label_noise(labels, 1.0, 4, seed=0)
    assert len(flipped) == 6000 and bool((noisy != 0).all())
    counts = torch.bincount(noisy, minlength=4)[1:].double()
    assert float((counts / 6000 - 1 / 3).abs().max()) < 0.03  # uniform over the 3 other classes


def test_label_noise_is_deterministic_per_seed_and_leaves_input_alone():
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(1))
    original = labels.clone()
    a = apply_label_noise(labels, 0.3, 10, seed=5)
    b = apply_label_noise(labels, 0.3, 10, seed=5)
    c = apply_label_noise(labels, 0.3, 10, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(labels, original)


def test_label_noise_rejects_bad_arguments():
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="rate"):
        apply_label_noise(labels, 1.5, 3)
    with pytest.raises(ValueError, match="'uniform'"):
        apply_label_noise(labels, 0.5, 3, kind="uniform")
    with pytest.raises(ValueError, match="0..1"):
        apply_label_noise(labels, 0.5, 2)


# CIFAR-10's asymmetric map (Patrini et al. 2017), by label index in CIFAR-10's class order:
# truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PATRINI = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def test_cifar10_asymmetric_map_follows_patrini_et_al():
    assert asymmetric_class_map("cifar10", CIFAR10) == PATRINI
    # A class selection keeps the pairs whose two classes are both kept, in the new indices.
    assert asymmetric_class_map("cifar10[0-4]", CIFAR10[:5]) == {2: 0}
    assert asymmetric_class_map("cifar10[3,5,9]", ["cat", "dog", "truck"]) == {0: 1, 1: 0}
    with pytest.raises(ValueError, match="class map for \\['cifar10'\\] only .* not for dataset 'digits'"):
        asymmetric_class_map("digits", [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="keeps no pair"):
        asymmetric_class_map("cifar10[6,8]", ["frog", "ship"])


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.37, 1.0])
def test_asymmetric_noise_flips_round_rate_n_of_each_source_class_to_its_target(rate):
    counts = [50, 61, 73, 89, 97, 101, 113, 127, 131, 139]  # unequal classes: per-class rounding shows
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    noisy, flipped = apply_label_noise(labels, rate, 10, kind="asymmetric", seed=4, class_map=PATRINI)
    assert torch.equal((noisy != labels).nonzero().flatten(), flipped)
    for c, n in enumerate(counts):
        members = labels == c
        moved = members & (noisy != labels)
        if c in PATRINI:
            assert int(moved.sum()) == round(rate * n), c
            assert bool((noisy[moved] == PATRINI[c]).all())
        else:
            assert int(moved.sum()) == 0, c  # airplane, automobile, frog, horse, ship stay clean
    assert len(flipped) == sum(round(rate * counts[c]) for c in PATRINI)
    again = apply_label_noise(labels, rate, 10, kind="asymmetric", seed=4, class_map=PATRINI)
    assert torch.equal(again[0], noisy) and torch.equal(again[1], flipped)
    if 0 < rate < 1:
        other = apply_label_noise(labels, rate, 10, kind="asymmetric", seed=5, class_map=PATRINI)
        assert not torch.equal(other[1], flipped)


def test_asymmetric_noise_needs_a_class_map():
    with pytest.raises(ValueError, match="needs a class_map"):
        apply_label_noise(torch.arange(10), 0.5, 10, kind="asymmetric")
    with pytest.raises(ValueError, match="must join two different classes"):
        apply_label_noise(torch.arange(10), 0.5, 10, kind="asymmetric", class_map={3: 3})


def test_asymmetric_scenario_on_cifar10_and_a_clear_error_elsewhere(monkeypatch):
    import samtune.data.scenarios as scenarios
    from samtune.data.dataset import Dataset

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1000, 3, 4, 4), dtype=torch.uint8, generator=gen)
    fake = Dataset(
        name="cifar10",
        train_x=images,
        train_y=torch.arange(1000) % 10,
        test_x=torch.zeros(20, 3, 4, 4, dtype=torch.uint8),
        test_y=torch.arange(20) % 10,
        classes=list(CIFAR10),
    )
    monkeypatch.setattr(scenarios, "load_dataset", lambda name, root=None: fake)
    sc = build_scenario({"dataset": "cifar10", "label_noise_rate": 0.4, "label_noise_kind": "asymmetric"})
    assert sc.cell == "noise=0.4 asymmetric"
    y_true = torch.cat([sc.train_y_true, sc.val_y_true])
    y = torch.cat([sc.train_y, sc.val_y])
    for c in range(10):  # 100 examples per class: 40 of each source class flip, all to its target
        moved = (y_true == c) & (y != y_true)
        assert int(moved.sum()) == (40 if c in PATRINI else 0)
        if c in PATRINI:
            assert bool((y[moved] == PATRINI[c]).all())
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not for dataset 'digits'"):
        build_scenario({"dataset": "digits", "label_noise_rate": 0.2, "label_noise_kind": "asymmetric"})


def test_scenario_keeps_the_flipped_indices_and_the_clean_validation_labels():
    ds = load_dataset("digits")
    sc = build_scenario({"dataset": "digits", "label_noise_rate": 0.3, "seed": 2})
    for split in ("train", "val"):
        y, y_true = getattr(sc, f"{split}_y"), getattr(sc, f"{split}_y_true")
        flipped = getattr(sc, f"{split}_flipped")
        assert flipped.dtype == torch.int64 and torch.equal(flipped, (y != y_true).nonzero().flatten())
    assert len(sc.train_flipped) + len(sc.val_flipped) == round(0.3 * len(ds.train_y))
    # val_y_true holds each validation image's own clean label.
    true_by_image = {bytes(x.numpy().tobytes()): int(t) for x, t in zip(ds.train_x, ds.train_y)}
    assert sc.val_y_true.tolist() == [true_by_image[bytes(x.numpy().tobytes())] for x in sc.val_x]
    clean = build_scenario({"dataset": "digits", "seed": 2})
    assert len(clean.train_flipped) == 0 and torch.equal(clean.val_y, clean.val_y_true)


def _rows(x):
    return {bytes(r.numpy().tobytes()) for r in x.reshape(len(x), -1)}


def test_label_noise_scenario_splits_noisy_train_and_keeps_test_clean():
    ds = load_dataset("digits")
    sc = build_scenario({"dataset": "digits", "label_noise_rate": 0.4, "val_fraction": 0.1, "seed": 0})
    assert sc.name == "label_noise" and sc.cell == "noise=0.4" and sc.augment is False
    n = len(ds.train_y)
    assert len(sc.val_y) == round(0.1 * n) and len(sc.train_y) + len(sc.val_y) == n
    # Test set is the dataset's own, untouched.
    assert torch.equal(sc.test_x, ds.test_x) and torch.equal(sc.test_y, ds.test_y)
    # Noise: 40% of all training labels (train + val together) differ from the clean ones.
    true_by_image = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(ds.train_x, ds.train_y)}
    val_true = torch.tensor([true_by_image[bytes(x.numpy().tobytes())] for x in sc.val_x])
    flips = int((sc.train_y != sc.train_y_true).sum()) + int((sc.val_y != val_true).sum())
    assert flips == round(0.4 * n)  # digits training images are all distinct, so lookups are exact
    assert torch.equal(sc.train_y_true, torch.tensor([true_by_image[bytes(x.numpy().tobytes())] for x in sc.train_x]))
    assert not (_rows(sc.val_x) & _rows(sc.train_x))
    assert sc.num_classes == 10 and sc.input_shape == (1, 8, 8)


def test_scenario_is_deterministic_and_data_subset_is_seeded():
    cfg = {"dataset": "digits", "label_noise_rate": 0.2, "data_subset": 300, "seed": 1}
    a, b = build_scenario(cfg), build_scenario(dict(cfg))
    assert len(a.train_y) + len(a.val_y) == 300
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y) and torch.equal(a.val_y, b.val_y)
    c = build_scenario({**cfg, "seed": 2})
    assert not torch.equal(a.train_x, c.train_x)
    # data_seed pins the data while the trial seed varies.
    d = build_scenario({**cfg, "seed": 2, "data_seed": 1})
    assert torch.equal(a.train_y, d.train_y) and torch.equal(a.train_x, d.train_x)


def test_scenario_model_matches_data():
    sc = build_scenario({"dataset": "digits"})
    model = sc.build_model("cnn", "group")
    assert model(torch.zeros(2, *sc.input_shape)).shape == (2, 10)
    assert sc.initial_state is None


def test_scenario_rejects_bad_config():
    with pytest.raises(ValueError, match="scenario 'mixup'"):
        build_scenario({"dataset": "digits", "scenario": "mixup"})
    with pytest.raises(ValueError, match="val_fraction"):
        build_scenario({"dataset": "digits", "val_fraction": 1.0})


# --- finetuning ------------------------------------------------------------------------------


FINETUNE = {"dataset": "digits[5-9]", "scenario": "finetune", "model": "cnn", "norm": "batch", "seed": 0}


def saved_weights(path: Path, num_classes: int = 10, norm: str = "batch", wrap=None) -> dict:
    torch.manual_seed(7)
    model = build_model("cnn", num_classes, (1, 8, 8), norm)
    with torch.no_grad():  # distinctive running statistics, so a fresh model cannot match by chance
        for name, buf in model.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    state = model.state_dict()
    torch.save(wrap(state) if wrap else state, path)
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize(
    "wrap",
    [None, lambda s: {"model": s, "epoch": 3}, lambda s: {f"module.{k}": v for k, v in s.items()}],
    ids=["state_dict", "checkpoint", "ddp"],
)
def test_finetune_loads_the_backbone_and_puts_a_new_head_for_the_target_classes(tmp_path, wrap):
    source = saved_weights(tmp_path / "w.pt", wrap=wrap)
    sc = build_scenario({**FINETUNE, "finetune_source": str(tmp_path / "w.pt")})
    assert sc.name == "finetune" and sc.num_classes == 5 and sc.classes == ["5", "6", "7", "8", "9"]
    model = sc.build_model("cnn", "batch")
    assert model.head.out_features == 5
    state = model.state_dict()
    backbone = [k for k in source if not k.startswith("head.")]
    assert len(backbone) == len(state) - 2 and all(torch.equal(state[k], source[k]) for k in backbone)
    # The head is the model's own fresh initialisation (nn.Linear's uniform(+-1/sqrt(fan_in))).
    assert float(model.head.weight.abs().max()) <= 128**-0.5
    assert sc.freeze_bn is False and sc.backbone_lr_scale == 1.0
    # Test set: only digits 5..9, relabelled 0..4, clean.
    full = load_dataset("digits")
    assert torch.equal(sc.test_y, full.test_y[full.test_y >= 5] - 5)


def test_finetune_freezes_batchnorm_statistics_when_asked(tmp_path):
    source = saved_weights(tmp_path / "w.pt")
    sc = build_scenario(
        {**FINETUNE, "finetune_source": str(tmp_path / "w.pt"), "freeze_bn": True, "backbone_lr_scale": 0.1}
    )
    model = sc.build_model("cnn", "batch").train()
    assert all(type(m) is FrozenStatsBatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model(sc.train_x[:32].float())
    stats = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert stats and all(torch.equal(v, source[k]) for k, v in stats.items())
    groups = param_groups(model, lr=0.2, backbone_lr_scale=sc.backbone_lr_scale)
    head_ids = {id(p) for p in model.head.parameters()}
    assert [g["lr"] for g in groups] == [0.2, pytest.approx(0.02)]
    assert {id(p) for p in groups[0]["params"]} == head_ids
    assert len(groups[1]["params"]) == len(list(model.parameters())) - 2


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    saved_weights(tmp_path / "gn.pt", norm="group")
    sc = build_scenario({**FINETUNE, "finetune_source": str(tmp_path / "gn.pt")})
    with pytest.raises(ValueError, match="do not fit SmallCNN apart from its head.*missing"):
        sc.build_model("cnn", "batch")
    with pytest.raises(ValueError, match="mis-shaped"):
        load_backbone(build_model("cnn", 5, (3, 8, 8)), read_state_dict(tmp_path / "gn.pt"))


def test_missing_or_unusable_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs finetune_source"):
        build_scenario(FINETUNE)
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist.*--save-weights"):
        build_scenario({**FINETUNE, "finetune_source": str(tmp_path / "nope.pt")})
    with pytest.raises(ValueError, match="neither an existing file"):
        build_scenario({**FINETUNE, "finetune_source": "imagenet"})
    torch.save({"lr": 0.1}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        build_scenario({**FINETUNE, "finetune_source": str(tmp_path / "opt.pt")})
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        build_scenario({**FINETUNE, "finetune_source": str(tmp_path / "text.pt")})


def test_torchvision_weights_come_from_the_local_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="not in the local cache at .*resnet18-f37072fd.pth"):
        resolve_source("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        resolve_source("torchvision:ResNet999_Weights.X")
    imagenet = build_model("torchvision:resnet18", 1000, (3, 32, 32))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    path = resolve_source("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    model = load_backbone(build_model("torchvision:resnet18", 10, (3, 32, 32)), read_state_dict(path))
    assert model.fc.out_features == 10
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)


def test_weights_logged_to_mlflow_are_a_source(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("pretrain", artifact_location=(tmp_path / "artifacts").as_uri())
        source = saved_weights(tmp_path / "weights.pt")
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifact(str(tmp_path / "weights.pt"), artifact_path="pretrained")
        for where in (f"runs:/{run.info.run_id}/pretrained/weights.pt", f"runs:/{run.info.run_id}/pretrained"):
            state = read_state_dict(resolve_source(where))
            assert all(torch.equal(state[k], v) for k, v in source.items())
        with pytest.raises(FileNotFoundError, match="cannot fetch finetune_source"):
            resolve_source(f"runs:/{run.info.run_id}/absent.pt")
    finally:
        mlflow.set_tracking_uri(None)  # the global URI would outlive this test otherwise


def _scenario_with_pretraining(config):
    """The trainer's first steps: pretrain a dataset-named source (once, cached), then build."""
    from samtune.trial.pretrain import pretrained_state

    return build_scenario(config, initial_state=pretrained_state(config))


def test_a_dataset_source_is_pretrained_once_and_learns_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    config = {**FINETUNE, "finetune_source": "digits[0-4]", "pretrain_epochs": 3, "batch_size": 64, "epochs": 1}
    sc = _scenario_with_pretraining(config)
    (weights,) = (tmp_path / "cache" / "pretrained").glob("*.pt")
    # The pretrained network (with its own head) classifies the source task's test digits.
    source = load_dataset("digits[0-4]")
    net = build_model("cnn", 5, (1, 8, 8))
    net.load_state_dict(read_state_dict(weights))
    from samtune.data.transforms import to_float

    with torch.no_grad():
        pred = net.eval()(to_float(source.test_x, source.mean, source.std)).argmax(1)
    assert float((pred == source.test_y).double().mean()) > 0.9
    # A second trial of the sweep finds the cached file and does not train again.
    import samtune.trial.pretrain

    monkeypatch.setattr(samtune.trial.pretrain, "run", lambda *a, **k: pytest.fail("pretrained a second time"))
    again = _scenario_with_pretraining(dict(config))
    assert all(torch.equal(again.initial_state[k], v) for k, v in sc.initial_state.items())
    # The trial's batch size (a setting a sweep may search) does not pick the pretraining ...
    _scenario_with_pretraining({**config, "batch_size": 32})
    assert len(list((tmp_path / "cache" / "pretrained").glob("*.pt"))) == 1
    # ... while a different pretraining config is a different cache entry.
    for change in ({"pretrain_epochs": 4}, {"pretrain_batch_size": 32}):
        with pytest.raises(pytest.fail.Exception, match="pretrained a second time"):
            _scenario_with_pretraining({**config, **change})


def test_a_dataset_source_pretrains_inside_one_rank_of_a_process_group(tmp_path, monkeypatch):
    """A multi-worker finetuning trial: every worker builds its scenario inside an initialised
    torch.distributed group. Pretraining there trains alone, without a collective."""
    import torch.distributed as dist

    from samtune.trial.config import TrialConfigError
    from samtune.trial.entry import fit

    monkeypatch.setenv("SAMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    # This process plays rank 1 of 2; any collective would hang a real job, so here it fails.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def collective(*args, **kwargs):
        raise AssertionError("pretraining called a collective")

    for name in ("all_reduce", "broadcast", "barrier", "all_gather", "new_group"):
        monkeypatch.setattr(dist, name, collective)
    with pytest.raises(TrialConfigError, match="torch.distributed is initialised with 2 ranks"):
        fit({"dataset": "digits", "epochs": 1})  # a plain fit() still refuses, as documented
    config = {
        **FINETUNE,
        "finetune_source": "digits[0-4]",
        "pretrain_epochs": 1,
        "pretrain_subset": 256,
        "epochs": 1,
        "batch_size": 64,
    }
    sc = _scenario_with_pretraining(config)
    (weights,) = (tmp_path / "cache" / "pretrained").glob("*.pt")
    state = read_state_dict(weights)
    assert all(torch.equal(sc.initial_state[k], v) for k, v in state.items())
    assert state["head.weight"].shape == (5, 128)  # the source task's own head


def test_finetune_with_equal_class_counts_still_gets_a_new_head(tmp_path):
    # Source and target both have 10 classes, so the source head would fit: it must not be used.
    source = saved_weights(tmp_path / "w.pt", num_classes=10)
    sc = build_scenario({**FINETUNE, "dataset": "digits", "finetune_source": str(tmp_path / "w.pt")})
    model = sc.build_model("cnn", "batch")
    assert model.head.weight.shape == source["head.weight"].shape
    assert not torch.equal(model.head.weight, source["head.weight"])
    assert not torch.equal(model.head.bias, source["head.bias"])
    backbone = [k for k in source if not k.startswith("head.")]
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in backbone)


# -- the finetuning's starting point -------------------------------------------------------------


def test_the_starting_points_head_is_the_penalised_logistic_regression_sklearn_fits():
    from sklearn.linear_model import LogisticRegression

    from samtune.trial.probe import L2, fit_head

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(300, 6, generator=gen)
    labels = (features[:, :3] @ torch.randn(3, 3, generator=gen) + 0.8 * torch.randn(300, 3, generator=gen)).argmax(1)
    weight, bias = fit_head(features, labels, 3)
    # Ours: mean cross-entropy + L2 * ||W||^2, bias free. sklearn: C * summed cross-entropy +
    # ||W||^2 / 2, intercept free: the same minimiser at C = 1 / (2 * n * L2).
    reference = LogisticRegression(C=1 / (2 * len(labels) * L2), tol=1e-10, max_iter=10_000)
    reference.fit(features.double().numpy(), labels.numpy())
    ours = torch.softmax(features @ weight.T + bias, 1).double().numpy()
    assert abs(ours - reference.predict_proba(features.double().numpy())).max() < 2e-3


def test_a_finetuning_trial_reports_its_pretrained_starting_point_with_its_first_epoch(tmp_path, monkeypatch):
    from samtune.trial.entry import fit

    monkeypatch.setenv("SAMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    config = {
        **FINETUNE,
        "finetune_source": "digits[0-4]",
        "pretrain_epochs": 6,
        "batch_size": 64,
        "epochs": 2,
        "lr": 0.02,
        "backbone_lr_scale": 0.1,
        "label_noise_rate": 0.4,
        "sharpness_measures": (),
    }
    epochs = []
    fit(config, report=epochs.append)
    first, second = epochs
    # The pretrained backbone under a fitted head is far better than chance on the target's 5
    # classes (0.8), whose labels it never saw, even at 40% noise; reported once, before training.
    assert first["pretrained_test_error"] < 0.5 and 0.0 <= first["pretrained_val_error"] <= 1.0
    assert "pretrained_test_error" not in second
    # Nothing else changes: the same trial with the probe's head fit skipped trains the same.
    monkeypatch.setattr("samtune.trial.loop.starting_point", lambda state: {})
    again = []
    fit(config, report=again.append)
    assert again[1]["test_error"] == second["test_error"] and again[1]["train_loss"] == second["train_loss"]

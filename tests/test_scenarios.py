"""Label noise, splits and the scenarios built from a trial config."""
from __future__ import annotations

import pytest
import torch

from samtune.data import load_dataset
from samtune.scenarios import apply_label_noise, build_scenario


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

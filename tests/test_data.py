"""Datasets, normalisation and batched augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune.data import augment_batch, channel_stats, load_dataset, to_float


def test_digits_is_uint8_scaled_with_fixed_stratified_split():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (1437, 1, 8, 8)
    assert ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_y.dtype == torch.int64 and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0
    # Every image of the split is one of sklearn's images, scaled 0..16 -> 0..255.
    raw = load_digits()
    scaled = np.rint(raw.images * 255 / 16).astype(np.uint8).reshape(len(raw.images), -1)
    lookup = {img.tobytes(): int(t) for img, t in zip(scaled, raw.target)}
    for x, y in zip(ds.test_x[:50], ds.test_y[:50]):
        assert lookup[x.numpy().reshape(-1).tobytes()] == int(y)
    # Stratified: each class is within one example of its share of the 360 test images.
    counts = torch.bincount(ds.test_y, minlength=10).numpy()
    expected = np.bincount(raw.target) * 360 / len(raw.target)
    assert np.all(np.abs(counts - expected) <= 1)
    again = load_dataset("digits")
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


def test_to_float_normalises_each_channel():
    x = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = to_float(x, mean, std)
    expected = (x.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one per channel"):
        to_float(x, (0.1, 0.2), (0.3, 0.3))


def test_dataset_stats_make_training_images_zero_mean_unit_std():
    ds = load_dataset("digits")
    z = to_float(ds.train_x, ds.mean, ds.std)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    mean, std = channel_stats(ds.train_x)
    assert mean == pytest.approx((float(ds.train_x.double().mean() / 255),), rel=1e-9)


def test_augment_batch_crops_within_padding_and_flips_deterministically():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (256, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is visible
    out = augment_batch(x, gen, pad=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen_flip = seen_plain = seen_shift = 0
    for i in range(len(x)):
        # Independently: the output must equal some window of the padded image, maybe mirrored.
        match = None
        for dy in range(5):
            for dx in range(5):
                win = padded[i, :, dy:dy + 8, dx:dx + 8]
                if torch.equal(out[i], win):
                    match = (dy, dx, False)
                elif torch.equal(out[i], win.flip(2)):
                    match = (dy, dx, True)
        assert match is not None, f"image {i} is not a crop of its padded input"
        seen_flip += match[2]
        seen_plain += not match[2]
        seen_shift += match[:2] != (2, 2)
    assert seen_flip > 80 and seen_plain > 80 and seen_shift > 200
    again = augment_batch(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(again, out)
    assert not torch.equal(augment_batch(x, torch.Generator().manual_seed(1), pad=2), out)


def test_augment_batch_without_pad_only_flips():
    x = torch.randint(0, 256, (32, 1, 5, 5), dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(3), pad=0)
    for a, b in zip(out, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))


def test_unknown_dataset_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")

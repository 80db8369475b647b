"""Datasets, normalisation and batched augmentation."""

from __future__ import annotations

import io
import pickle
import socket
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from samtune.data import cifar as data_cifar
from samtune.data import images as data_images
from samtune.data.dataset import DataNotFoundError, DataUnreadableError
from samtune.data.load import load_dataset, parse_dataset_name, select_classes
from samtune.data.transforms import augment_batch, channel_stats, to_float


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


def test_digits_are_cached_once_and_read_back_without_importing_scikit_learn(tmp_path):
    import subprocess
    import sys

    from samtune.data.load import build_digits

    ds = load_dataset("digits", cache_dir=tmp_path)
    (cached,) = tmp_path.glob("digits-*.samtune.pt")
    fresh = build_digits()  # straight from scikit-learn, no cache involved
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(ds, key), fresh[key]), key
    # A trial process: the cache is read, scikit-learn (about 1.2 s to import) is not loaded.
    code = (
        "import sys; from samtune.data import load_dataset; "
        f"ds = load_dataset('digits', cache_dir={str(tmp_path)!r}); "
        "print(len(ds.train_y), 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1437", "False"]
    # A damaged cache is rebuilt, with a warning, never trusted.
    cached.write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="unusable"):
        again = load_dataset("digits", cache_dir=tmp_path)
    assert torch.equal(again.test_y, fresh["test_y"])


def test_to_float_normalises_each_channel():
    x = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = to_float(x, mean, std)
    expected = (x.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(
        1, 3, 1, 1
    )
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
                win = padded[i, :, dy : dy + 8, dx : dx + 8]
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


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and ImageFolder trees, against a subset of the shared CIFAR-10 JPEG copy. The reference
# readings go through `tarfile` and PIL, independently of samtune's own batched decoder.


SHARED_TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# CIFAR-10's published label order (batches.meta of the canonical copy).
CIFAR10_ORDER = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = {"train": 12, "test": 4}

needs_shared = pytest.mark.skipif(
    not SHARED_TARBALL.is_file(), reason=f"shared CIFAR-10 copy not found at {SHARED_TARBALL}"
)


def pil_decode(blob: bytes) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def cifar_subset():
    """{(split, class): [(file name, jpeg bytes), ...]}: the first images of each class in the tarball."""
    if not SHARED_TARBALL.is_file():
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_TARBALL}")
    found: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    with tarfile.open(SHARED_TARBALL, "r|gz") as tf:
        for member in tf:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4:
                key = (parts[1], parts[2])
                items = found.setdefault(key, [])
                if len(items) < PER_CLASS[parts[1]]:
                    items.append((parts[3], tf.extractfile(member).read()))
    assert sorted({c for _, c in found}) == CIFAR10_ORDER
    return found


def write_tree(root: Path, subset, skip_class: str | None = None) -> Path:
    for (split, cls), items in subset.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        if cls == skip_class and split == "train":
            continue
        for name, blob in items:
            (folder / name).write_bytes(blob)
    return root


def expected_split(subset, split: str, classes=CIFAR10_ORDER):
    """Reference tensors: images sorted by class (in ``classes`` order) then file name."""
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for _name, blob in sorted(subset[(split, cls)]):
            xs.append(pil_decode(blob))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


@needs_shared
def test_imagefolder_tree_decodes_every_image_as_pil_does(cifar_subset, tmp_path):
    root = write_tree(tmp_path / "tree", cifar_subset)
    ds = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert ds.classes == sorted(CIFAR10_ORDER)
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (120, 3, 32, 32)
    for split in ("train", "test"):
        x, y = expected_split(cifar_subset, split)
        assert torch.equal(getattr(ds, f"{split}_x"), x)
        assert torch.equal(getattr(ds, f"{split}_y"), y)


@needs_shared
def test_tarball_of_a_tree_loads_like_the_tree(cifar_subset, tmp_path):
    root = write_tree(tmp_path / "cifar10-jpeg", cifar_subset)
    archive = tmp_path / "subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="cifar10-jpeg")
    from_tar = load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")
    from_dir = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(from_tar, key), getattr(from_dir, key))
    assert from_tar.classes == from_dir.classes


@needs_shared
def test_cifar10_from_a_data_root_tree_or_tarball_has_cifar_class_order(cifar_subset, tmp_path):
    data_root = tmp_path / "data"
    write_tree(data_root / "cifar10-jpeg", cifar_subset)
    ds = load_dataset("cifar10", data_root, cache_dir=tmp_path / "cache", download=False)
    assert ds.classes == CIFAR10_ORDER and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    x, y = expected_split(cifar_subset, "test")
    assert torch.equal(ds.test_x, x) and torch.equal(ds.test_y, y)
    archive = tmp_path / "my-cifar10.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(data_root / "cifar10-jpeg", arcname="cifar10-jpeg")
    from_tar = load_dataset("cifar10", archive, cache_dir=tmp_path / "cache", download=False)
    assert torch.equal(from_tar.train_x, ds.train_x) and torch.equal(from_tar.train_y, ds.train_y)


def write_canonical_cifar10(folder: Path, subset) -> None:
    """The pickled layout of cifar-10-python.tar.gz: data rows of 3072 bytes (R, G, B planes)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        x, y = expected_split(subset, split)
        order = rng.permutation(len(y))  # canonical batches are not sorted by class
        chunks = np.array_split(order, len(files))
        for fname, idx in zip(files, chunks):
            batch = {
                "batch_label": fname,
                "labels": [int(v) for v in y[idx]],
                "data": x[idx].reshape(len(idx), -1).numpy(),
                "filenames": [f"{i}.png" for i in idx],
            }
            (folder / fname).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_ORDER}))


def accept_handwritten_batches(monkeypatch):
    """torchvision checks the published MD5s, which hand-written batches cannot match."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)


@needs_shared
def test_canonical_pickled_cifar10_reads_as_torchvision_reads_it(cifar_subset, tmp_path, monkeypatch):
    import torchvision

    write_canonical_cifar10(tmp_path / "cifar-10-batches-py", cifar_subset)
    accept_handwritten_batches(monkeypatch)
    ds = load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache", download=False)
    for split in ("train", "test"):
        ref = torchvision.datasets.CIFAR10(str(tmp_path), train=split == "train", download=False)
        assert torch.equal(getattr(ds, f"{split}_x"), torch.from_numpy(ref.data).permute(0, 3, 1, 2))
        assert torch.equal(getattr(ds, f"{split}_y"), torch.tensor(ref.targets))
    assert ds.classes == ref.classes


@needs_shared
def test_second_load_reads_the_cache_and_does_not_decode(cifar_subset, tmp_path, monkeypatch):
    root = write_tree(tmp_path / "tree", cifar_subset)
    first = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.samtune.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although a valid cache exists")

    monkeypatch.setattr(data_images, "decode_images", no_decoding)
    again = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)


def _refuse(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} again although a valid cache exists")

    return refuse


@needs_shared
def test_second_load_of_a_jpeg_tarball_reads_the_cache(cifar_subset, tmp_path, monkeypatch):
    root = write_tree(tmp_path / "cifar10-jpeg", cifar_subset)
    archive = tmp_path / "subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="cifar10-jpeg")
    first = load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.samtune.pt"))) == 1
    monkeypatch.setattr(data_images, "read_tar", _refuse("read the tarball"))
    monkeypatch.setattr(data_cifar, "extract_pickles", _refuse("read the tarball"))
    monkeypatch.setattr(data_images, "decode_images", _refuse("decoded"))
    again = load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, key), getattr(first, key))


@needs_shared
def test_pickled_cifar10_tarball_is_decompressed_once_then_cached(cifar_subset, tmp_path, monkeypatch):
    folder = tmp_path / "unpacked" / "cifar-10-batches-py"
    write_canonical_cifar10(folder, cifar_subset)
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"  # the name cs.toronto.edu serves
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    accept_handwritten_batches(monkeypatch)
    reference = load_dataset("cifar10", tmp_path / "unpacked", cache_dir=tmp_path / "unused", download=False)
    first = load_dataset("cifar10", archive.parent, cache_dir=tmp_path / "cache", download=False)
    assert len(list((tmp_path / "cache").glob("*.samtune.pt"))) == 1
    monkeypatch.setattr(data_images, "read_tar", _refuse("decompressed the tarball"))
    monkeypatch.setattr(data_cifar, "extract_pickles", _refuse("decompressed the tarball"))
    monkeypatch.setattr(data_cifar, "cifar_from_pickles", _refuse("unpickled"))
    again = load_dataset("cifar10", archive.parent, cache_dir=tmp_path / "cache", download=False)
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, key), getattr(reference, key)), key
        assert torch.equal(getattr(again, key), getattr(reference, key)), key
    assert again.classes == reference.classes == CIFAR10_ORDER
    # The tarball itself passed as the data root goes through the same cache.
    assert torch.equal(
        load_dataset("cifar10", archive, cache_dir=tmp_path / "cache", download=False).train_x, reference.train_x
    )


@needs_shared
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_cache_is_detected_and_rebuilt(cifar_subset, tmp_path, damage):
    root = write_tree(tmp_path / "tree", cifar_subset)
    good = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.samtune.pt")
    blob = bytearray(cache_file.read_bytes())
    if damage == "flip":  # inside the image tensor: only the checksum can notice
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "truncate":
        del blob[len(blob) // 3 :]
    else:
        blob[:] = b"not a tensor file"
    cache_file.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert torch.equal(rebuilt.train_x, good.train_x) and torch.equal(rebuilt.train_y, good.train_y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file is whole again: no warning
        assert torch.equal(load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache").test_x, good.test_x)


@needs_shared
def test_adding_an_image_invalidates_the_cache(cifar_subset, tmp_path):
    root = write_tree(tmp_path / "tree", cifar_subset)
    before = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    name, blob = cifar_subset[("test", "cat")][0]
    (root / "train" / "cat" / f"extra-{name}").write_bytes(blob)
    after = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert len(after.train_y) == len(before.train_y) + 1
    cat = sorted(CIFAR10_ORDER).index("cat")
    assert int((after.train_y == cat).sum()) == PER_CLASS["train"] + 1


@needs_shared
def test_empty_class_folder_is_a_clear_error(cifar_subset, tmp_path):
    root = write_tree(tmp_path / "tree", cifar_subset, skip_class="frog")
    with pytest.raises(ValueError, match="class folder train/frog/ holds no images"):
        load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="tree")
    with pytest.raises(ValueError, match="class folder train/frog/ holds no images"):
        load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")


def test_malformed_trees_are_clear_errors(tmp_path):
    from PIL import Image

    root = tmp_path / "tree"
    for split, cls, size in (("train", "a", 8), ("train", "b", 9), ("test", "a", 8), ("test", "b", 8)):
        (root / split / cls).mkdir(parents=True)
        Image.new("RGB", (size, size)).save(root / split / cls / "x.png")
    with pytest.raises(ValueError, match="all images of a dataset must share one size"):
        load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    (root / "test" / "b" / "x.png").unlink()
    (root / "test" / "b").rmdir()
    with pytest.raises(ValueError, match="class folders differ between train/"):
        load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")


def test_missing_cifar_offline_names_the_paths_tried_and_how_to_supply_it(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and str(tmp_path / "cifar10-jpeg") in message
    assert "--data-root" in message and "SAMTUNE_DATA_ROOT" in message and "downloads are off" in message
    with pytest.raises(DataNotFoundError, match="CIFAR-100 not found"):
        load_dataset("cifar100", tmp_path, download=False)


class _RunsCode:
    """Unpickling this creates a folder: what a crafted pickle in a data root could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def write_crafted_cifar10(folder: Path, marker: Path) -> None:
    """Every file of the pickled layout, each one a pickle that runs code when loaded."""
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    for name in names:
        (folder / name).write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": [0]}))


def refuse_unpickling(monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled a CIFAR file whose md5 is not the published one")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)


def test_cifar_batch_with_a_wrong_md5_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    write_crafted_cifar10(tmp_path / "data" / "cifar-10-batches-py", marker)
    refuse_unpickling(monkeypatch)
    with pytest.raises(DataUnreadableError, match=r"cannot be read \(data_batch_1 is not the published file"):
        load_dataset("cifar10", tmp_path / "data", cache_dir=tmp_path / "cache", download=False)
    # The same files as a tarball: unpacked to a scratch folder, refused, and the scratch removed.
    archive = tmp_path / "packed" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "data" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DataUnreadableError, match=r"cifar-10-python.tar.gz cannot be read \(data_batch_1 is not"):
        load_dataset("cifar10", archive.parent, cache_dir=tmp_path / "cache", download=False)
    assert not marker.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_cifar_tarball_with_a_member_outside_its_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "src" / "cifar-10-batches-py"
    write_crafted_cifar10(folder, tmp_path / "code-ran")
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
        escape = tarfile.TarInfo("../escaped")
        escape.size = 4
        tf.addfile(escape, io.BytesIO(b"evil"))
    refuse_unpickling(monkeypatch)
    with pytest.raises(DataUnreadableError, match="cannot be read .*outside the destination"):
        load_dataset("cifar10", archive.parent, cache_dir=tmp_path / "cache", download=False)
    assert not list(tmp_path.rglob("escaped"))


def test_image_tarball_members_outside_the_archive_are_ignored(tmp_path):
    from PIL import Image

    root = tmp_path / "tree"
    for split, cls, shade in (("train", "a", 10), ("train", "b", 20), ("test", "a", 30), ("test", "b", 40)):
        (root / split / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (shade, 0, 0)).save(root / split / cls / "x.png")
    stray = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(stray, format="PNG")
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="tree")
        for name in ("../outside/train/a/y.png", "/abs/train/a/y.png", "tree/../../train/a/y.png"):
            info = tarfile.TarInfo(name)
            info.size = len(stray.getvalue())
            tf.addfile(info, io.BytesIO(stray.getvalue()))
    from_tar = load_dataset(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")
    from_dir = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(from_tar, key), getattr(from_dir, key)), key
    assert len(from_tar.train_y) == 2 and not list(tmp_path.rglob("y.png"))


def test_unreachable_host_fails_fast_without_trying_to_download(tmp_path, monkeypatch):
    import torchvision

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("torchvision download attempted although the host is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    monkeypatch.delenv("SAMTUNE_OFFLINE", raising=False)
    with pytest.raises(DataNotFoundError, match="unreachable") as info:
        load_dataset("cifar10", tmp_path)
    assert "Paths tried" in str(info.value)


def test_class_selection_keeps_and_relabels_those_classes():
    full = load_dataset("digits")
    part = load_dataset("digits[2,5-7]")
    assert part.name == "digits[2,5-7]" and part.classes == ["2", "5", "6", "7"]
    for split in ("train", "test"):
        y_full = getattr(full, f"{split}_y")
        keep = (y_full == 2) | ((y_full >= 5) & (y_full <= 7))
        assert torch.equal(getattr(part, f"{split}_x"), getattr(full, f"{split}_x")[keep])
        expected = torch.tensor([{2: 0, 5: 1, 6: 2, 7: 3}[int(v)] for v in y_full[keep]])
        assert torch.equal(getattr(part, f"{split}_y"), expected)
    assert parse_dataset_name("cifar100[10-12,3]") == ("cifar100", [3, 10, 11, 12])
    assert parse_dataset_name("imagefolder:/data/pets") == ("imagefolder:/data/pets", None)
    for bad, message in (
        ("digits[4-2]", "reversed"),
        ("digits[1,1]", "twice"),
        ("digits[a]", "malformed"),
        ("digits[0-4", "malformed"),
        ("digits[10]", "names \\[10\\]"),
    ):
        with pytest.raises(ValueError, match=message):
            load_dataset(bad)
    with pytest.raises(ValueError, match="empty class selection"):
        select_classes(full, [])


@pytest.mark.slow
@needs_shared
def test_whole_shared_cifar10_copy_loads_with_cifar_labels(cifar_subset, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    # The shared folder itself as data root: the loader finds the tarball by its name.
    ds = load_dataset("cifar10", SHARED_TARBALL.parent, download=False)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert ds.classes == CIFAR10_ORDER
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(ds.test_y), torch.full((10,), 1000))
    # Files are NNNN.jpg, numbered from 0 within each class: image k of class c sits at c*n + k.
    for (split, cls), items in cifar_subset.items():
        n = 5000 if split == "train" else 1000
        c = CIFAR10_ORDER.index(cls)
        for name, blob in items[:2]:
            i = c * n + int(name.split(".")[0])
            assert torch.equal(getattr(ds, f"{split}_x")[i], pil_decode(blob)), (split, cls, name)
            assert int(getattr(ds, f"{split}_y")[i]) == c
    again = load_dataset("cifar10", SHARED_TARBALL.parent, download=False)
    assert torch.equal(again.train_x, ds.train_x)


def test_a_read_only_data_folder_gets_no_cache_file_even_for_root(tmp_path, monkeypatch):
    from samtune.data import cache as data

    monkeypatch.delenv("SAMTUNE_CACHE_DIR", raising=False)
    writable, locked = tmp_path / "mine", tmp_path / "shared"
    for folder in (writable, locked):
        folder.mkdir()
        (folder / "data.tar.gz").write_bytes(b"")
    locked.chmod(0o555)
    try:
        assert data.cache_dir_for(writable / "data.tar.gz") == writable
        assert data.cache_dir_for(locked / "data.tar.gz") == data.samtune_home()
    finally:
        locked.chmod(0o755)

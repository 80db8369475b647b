"""CIFAR-10N human label noise and its synthetic twins, on the shared files (../shared/data/).

References are independent of samtune's reader: the md5 and measured rates published beside the
files, the first canonical CIFAR-10 labels, and the shared JPEG copy's own folder names.
"""

import shutil
import time
from pathlib import Path

import pytest
import torch

from samtune.contract.keys import HUMAN_LABEL_SETS, NOISE_KINDS
from samtune.contract.values import SpaceError
from samtune.data import load_dataset
from samtune.data.dataset import Dataset, DataUnreadableError, samtune_home
from samtune.data.human_noise import (
    HUMAN_LABEL_FILES,
    HUMAN_NOISE_KINDS,
    TWIN_NOISE_KINDS,
    check_mapping,
    read_label_file,
    transition_matrix,
    twin_labels,
)
from samtune.data.scenarios import build_scenario
from samtune.sweep import Sweep
from samtune.sweep.preflight import PreflightError, check_cells

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARBALL = SHARED / "cifar10-jpeg.tar.gz"
C10N = SHARED / "CIFAR-10_human.pt"
needs_files = pytest.mark.skipif(
    not (TARBALL.is_file() and C10N.is_file()), reason=f"shared CIFAR-10 and CIFAR-10N files not found in {SHARED}"
)


@pytest.fixture(scope="module")
def labels():
    if not C10N.is_file():
        pytest.skip(f"{C10N} not found")
    return read_label_file(C10N, HUMAN_LABEL_FILES["cifar10"])


@pytest.fixture(scope="module")
def cifar10():
    if not TARBALL.is_file():
        pytest.skip(f"{TARBALL} not found")
    return load_dataset("cifar10", TARBALL, download=False)


def test_the_contract_names_every_label_set_of_the_files():
    assert set(HUMAN_NOISE_KINDS) == {f"human:{s}" for s in HUMAN_LABEL_SETS}
    assert set(TWIN_NOISE_KINDS) <= set(NOISE_KINDS) and set(HUMAN_NOISE_KINDS) <= set(NOISE_KINDS)


@needs_files
def test_measured_rates_are_the_published_ones(labels):
    # The data README's figures, to the hundredth of a percent.
    published = {"aggre": 9.01, "random1": 17.23, "random2": 18.12, "random3": 17.64, "worst": 40.21}
    for name, percent in published.items():
        measured = 100 * (labels[name] != labels["clean"]).double().mean().item()
        assert round(measured, 2) == percent, name
    assert labels["clean"][:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # canonical data_batch_1


@needs_files
def test_clean_labels_are_the_jpeg_copys_labels_in_its_folder_order(labels, cifar10):
    # The tree lists each class folder's files in order; canonical image i is file r of its class.
    order = torch.argsort(labels["clean"], stable=True)
    assert torch.equal(cifar10.train_y, labels["clean"][order])
    assert torch.equal(cifar10.train_y.bincount(), torch.full((10,), 5000))


@needs_files
def test_twin_has_the_human_transition_matrix_within_sampling_error(labels):
    clean, human = labels["clean"], labels["worst"]
    target = transition_matrix(clean, human, 10)
    for seed in (0, 1):
        twin = twin_labels(clean, target, seed)
        got = transition_matrix(clean, twin, 10)
        # Exact counts per class: off by at most one example in 5,000 per entry.
        assert (got - target).abs().max() <= 1 / 5000 + 1e-12
        assert abs((twin != clean).double().mean() - (human != clean).double().mean()) < 1e-3
    # On a random 5,000-image subset each entry is a binomial share: within 5 standard errors.
    subset = torch.randperm(50_000, generator=torch.Generator().manual_seed(3))[:5000]
    twin = twin_labels(clean, target, 0)[subset]
    got = transition_matrix(clean[subset], twin, 10)
    n = clean[subset].bincount(minlength=10).double().unsqueeze(1)
    assert ((got - target).abs() <= 5 * (target * (1 - target) / n).sqrt() + 1e-3).all()
    # ... and the twin mislabels other images than the humans did: only the matrix is shared.
    assert ((twin != clean[subset]) & (human[subset] != clean[subset])).double().mean() < 0.25


@needs_files
def test_scenarios_train_on_the_human_labels_and_name_the_kind(labels, cifar10):
    sc = build_scenario({"dataset": "cifar10", "data_root": str(TARBALL), "label_noise_kind": "human:aggre"})
    assert sc.cell == "CIFAR-10N aggre, 9.0%"
    assert len(sc.train_flipped) + len(sc.val_flipped) == 4505
    # Labels follow the images: the flipped set is exactly where the human label differs.
    order = torch.argsort(labels["clean"], stable=True)
    human_in_tree_order = labels["aggre"][order]
    assert sorted(sc.train_y.tolist() + sc.val_y.tolist()) == sorted(human_in_tree_order.tolist())
    with pytest.raises(ValueError, match="measured rate 0.0901; leave label_noise_rate unset"):
        build_scenario(
            {
                "dataset": "cifar10",
                "data_root": str(TARBALL),
                "label_noise_kind": "human:aggre",
                "label_noise_rate": 0.2,
            }
        )
    with pytest.raises(ValueError, match="for dataset 'cifar10' with all its classes"):
        build_scenario({"dataset": "cifar10[0-4]", "data_root": str(TARBALL), "label_noise_kind": "human:aggre"})


@pytest.mark.slow
@needs_files
def test_mapping_check_backs_the_right_mapping_and_rejects_a_shuffled_tree(labels, cifar10):
    order = torch.argsort(labels["clean"], stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(50_000)
    start = time.perf_counter()
    right = check_mapping(cifar10.train_x[position], labels["clean"], labels["aggre"])
    seconds = time.perf_counter() - start
    assert right.z > 8, right
    # A tree whose files are shuffled within each class folder: same labels, other images.
    gen = torch.Generator().manual_seed(0)
    shuffled = cifar10.train_x.clone()
    for c in range(10):
        members = (cifar10.train_y == c).nonzero().flatten()
        shuffled[members] = cifar10.train_x[members[torch.randperm(len(members), generator=gen)]]
    wrong = check_mapping(shuffled[position], labels["clean"], labels["aggre"])
    assert wrong.z < 4, wrong
    print(f"mapping check on 50,000 images: {seconds:.2f} s")
    assert seconds < 15, f"the mapping check took {seconds:.1f} s"
    tree = Dataset("cifar10", shuffled, cifar10.train_y, cifar10.test_x, cifar10.test_y, list(cifar10.classes))
    from samtune.data.human_noise import align

    with pytest.raises(ValueError, match="do not match CIFAR-10_human.pt's order"):
        align(tree, labels, HUMAN_LABEL_FILES["cifar10"])


def _sweep(root: Path) -> Sweep:
    return Sweep(
        name="cifar10n",
        dataset="cifar10",
        model="cnn",
        epochs=1,
        batch_size=64,
        trials=2,
        label_noise_rates=(),
        human_noise=("aggre",),
        fixed={"data_root": str(root)},
    )


@needs_files
def test_a_corrupted_or_foreign_label_file_is_refused_before_any_trial(tmp_path, cifar10, monkeypatch):
    # The decoded images' cache where the shared copy's is, not beside the link to it.
    monkeypatch.setenv("SAMTUNE_CACHE_DIR", str(samtune_home()))
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar10-jpeg.tar.gz").symlink_to(TARBALL)
    # A foreign file: a real torch.save'd dict of the right keys, but not the published one.
    fake = {k: torch.zeros(50_000, dtype=torch.int64).numpy() for k in ("clean_label", "aggre_label")}
    torch.save(fake, root / "CIFAR-10_human.pt")
    with pytest.raises(PreflightError, match=r"is not the published CIFAR-10N file: its md5 .* it was not unpickled"):
        check_cells(_sweep(root))
    # A corrupted copy: the published file with bytes changed.
    blob = bytearray(C10N.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (root / "CIFAR-10_human.pt").write_bytes(bytes(blob))
    with pytest.raises(PreflightError, match="is not the published CIFAR-10N file"):
        check_cells(_sweep(root))
    shutil.copy(C10N, root / "CIFAR-10_human.pt")
    check_cells(_sweep(root))  # the published file passes
    (root / "CIFAR-10_human.pt").unlink()
    with pytest.raises(FileNotFoundError, match="CIFAR-10N labels not found: no CIFAR-10_human.pt in"):
        check_cells(_sweep(root))
    with pytest.raises(DataUnreadableError, match="not the published"):
        read_label_file(Path(__file__), HUMAN_LABEL_FILES["cifar10"])


def test_sweep_cells_pair_each_human_kind_with_its_twin():
    sweep = Sweep(
        name="n", dataset="cifar10", model="cnn", epochs=1, batch_size=64, trials=2, human_noise=("aggre", "worst")
    )
    cells = sweep.cells()
    assert [(c.label_noise_kind, c.label_noise_rate) for c in cells] == [
        ("symmetric", 0.0),
        ("human:aggre", 0.0901),
        ("twin:aggre", 0.0901),
        ("human:worst", 0.40208),
        ("twin:worst", 0.40208),
    ]
    assert cells[2].label == "CIFAR-10N aggre, 9.0% (synthetic twin)"
    assert sweep.base_config(cells[3])["label_noise_kind"] == "human:worst"
    assert sweep.cell("twin:worst") is not None and sweep.cell("twin:worst").index == 4
    assert len({c.slug for c in cells}) == len(cells)
    from samtune.sweep.search import cell_index

    keys = [(c.label_noise_kind, c.label_noise_rate) for c in cells]
    assert [cell_index(keys, sweep.base_config(c)) for c in cells] == [0, 1, 2, 3, 4]
    with pytest.raises(SpaceError, match="CIFAR-10N has the label sets"):
        sweep.replace(human_noise=("noisy",))
    with pytest.raises(SpaceError, match="not for dataset 'digits'"):
        Sweep(name="n", dataset="digits", model="cnn", epochs=1, batch_size=64, trials=2, human_noise=("aggre",))


def _tiny_tree(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for cls, shade in (("a", 40), ("b", 200)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (shade, shade, shade)).save(root / split / cls / "0.png")
    return root


def test_a_dataset_read_through_the_cache_names_its_cache_file_fingerprint_and_digest(tmp_path):
    import hashlib

    from samtune.data.load import select_classes

    root = _tiny_tree(tmp_path / "tree")
    first = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    source = first.cached_as
    assert source is not None and source.file.parent == tmp_path / "cache" and source.file.is_file()
    blob = torch.load(source.file, weights_only=True)
    assert (blob["fingerprint"], blob["sha256"]) == (source.fingerprint, source.sha256)
    # The digest is of the tensors, computed here independently of the cache's reader.
    h = hashlib.sha256()
    for key in ("train_x", "train_y", "test_x", "test_y"):
        h.update(key.encode() + str(tuple(blob[key].shape)).encode() + blob[key].contiguous().numpy().tobytes())
    h.update(b"a\nb")
    assert h.hexdigest() == source.sha256
    # Read back from the cache: the same source; a changed copy: another fingerprint and file.
    assert load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache").cached_as == source
    (root / "train" / "a" / "1.png").write_bytes((root / "train" / "a" / "0.png").read_bytes())
    changed = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache").cached_as
    assert changed is not None and changed.fingerprint != source.fingerprint and changed.file != source.file
    assert select_classes(first, [0]).cached_as is None  # other tensors than the cache holds


@pytest.mark.slow
@needs_files
def test_a_passed_mapping_check_is_recorded_beside_the_cache_and_skipped_after(labels, cifar10, tmp_path, monkeypatch):
    import dataclasses
    import json

    from samtune.data import human_noise
    from samtune.data.dataset import CachedSource
    from samtune.data.human_noise import align, mapping_record_path

    assert cifar10.cached_as is not None  # the shared tarball is read through the tensor cache
    spec = HUMAN_LABEL_FILES["cifar10"]
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return check_mapping(*args, **kwargs)

    monkeypatch.setattr(human_noise, "check_mapping", counted)
    # The shared copy's images, as if cached under tmp_path (the record goes beside the cache file).
    source = CachedSource(tmp_path / "cifar10-0123456789abcdef.samtune.pt", "fp-1", cifar10.cached_as.sha256)
    copy = dataclasses.replace(cifar10, cached_as=source)
    expected = torch.argsort(torch.argsort(labels["clean"], stable=True))  # rank within class
    assert torch.equal(align(copy, labels, spec), expected) and len(calls) == 1
    record_path = mapping_record_path(copy, spec)
    assert record_path == tmp_path / "cifar10-0123456789abcdef.CIFAR-10_human-mapping.json"
    record = json.loads(record_path.read_text())
    assert record["fingerprint"] == "fp-1" and record["label_file_md5"] == spec.md5 and record["z"] > 8
    assert record_path.stat().st_mode & 0o077 == 0
    # A later process (a new Dataset object: nothing in memory) reads the record, not the images.
    again = dataclasses.replace(cifar10, cached_as=source)
    assert torch.equal(align(again, labels, spec), expected) and len(calls) == 1
    # A copy that changed: another fingerprint, or other tensors under the same one, is checked again.
    moved = dataclasses.replace(cifar10, cached_as=dataclasses.replace(source, fingerprint="fp-2"))
    assert torch.equal(align(moved, labels, spec), expected) and len(calls) == 2
    assert json.loads(record_path.read_text())["fingerprint"] == "fp-2"
    # A damaged record is no record.
    record_path.write_text("{not json")
    assert torch.equal(align(moved, labels, spec), expected) and len(calls) == 3
    # A tree whose files are shuffled within each class folder: other tensors, checked and refused,
    # and the failure leaves no record that could stand for it.
    gen = torch.Generator().manual_seed(0)
    shuffled = cifar10.train_x.clone()
    for c in range(10):
        members = (cifar10.train_y == c).nonzero().flatten()
        shuffled[members] = cifar10.train_x[members[torch.randperm(len(members), generator=gen)]]
    tree = dataclasses.replace(
        cifar10, train_x=shuffled, cached_as=CachedSource(tmp_path / "tree-fedcba9876543210.samtune.pt", "fp-3", "s")
    )
    for _ in range(2):
        with pytest.raises(ValueError, match="do not match CIFAR-10_human.pt's order"):
            align(tree, labels, spec)
    assert len(calls) == 5 and not mapping_record_path(tree, spec).exists()
    # Under the good copy's own key but with the shuffled tensors' digest: still checked, still refused.
    under_good_name = dataclasses.replace(tree, cached_as=dataclasses.replace(source, fingerprint="fp-2", sha256="s"))
    with pytest.raises(ValueError, match="do not match"):
        align(under_good_name, labels, spec)
    assert len(calls) == 6

"""`load_dataset`: a dataset by name, as whole uint8 tensors in memory.

Every dataset is held as one uint8 tensor per split (``[N, C, H, W]``) and one int64 label tensor,
as fast CIFAR loaders do (KellerJordan/cifar10-airbench): a training epoch is index arithmetic and
a few tensor ops on whole batches, never per-image Python or loader workers.

Datasets (`load_dataset(name, data_root)`):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes). It ships
  with scikit-learn, so it needs no download. Pixel values 0..16 are scaled to uint8 0..255; the
  train/test split is fixed (seed 0, stratified): 1,437 train, 360 test.
- ``cifar10`` / ``cifar100``: found under ``data_root`` (or ``$SAMTUNE_DATA_ROOT``, else
  ``~/.cache/samtune/data``) as the canonical pickled folder (``cifar-10-batches-py/``,
  ``cifar-100-python/``, what ``torchvision.datasets`` downloads), an ImageFolder tree
  (``train/<class>/*.jpg`` and ``test/<class>/*.jpg``), or a ``.tar.gz`` of either. With none there,
  torchvision downloads the pickled copy when the host answers within a few seconds; offline
  (or with ``SAMTUNE_OFFLINE=1``) a `DataNotFoundError` lists the paths tried and how to supply
  the data. Class indices follow CIFAR's own order whatever the source. Pickled files whose md5
  is not the published one are refused unread (`samtune.data.cifar`).
- ``imagefolder:<path>``: any ImageFolder tree or ``.tar.gz`` of one (``train/`` plus ``test/`` or
  ``val/``); class indices follow sorted class-folder names, as in ``torchvision.datasets.ImageFolder``.
  Images are decoded to RGB and must share one size.

Any name may end in a class selection, ``cifar10[0-4]`` or ``cifar100[3,7,10-19]``: only those
classes (indices in the full dataset's order) are kept, relabelled ``0..k-1`` in ascending order
of the original index. This gives transfer pairs within one dataset (pretrain on ``cifar10[0-4]``,
finetune on ``cifar10[5-9]``).

Decoded images are cached on disk as one tensor file (`samtune.data.cache`), so only the first
load of a source decodes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import torch

from samtune.data.cache import cached, source_fingerprint
from samtune.data.cifar import CIFAR, load_cifar
from samtune.data.dataset import (
    DIGITS_TEST_SIZE,
    DataNotFoundError,
    Dataset,
    samtune_home,
)
from samtune.data.images import load_image_tree


def _digits_source() -> Path | None:
    """scikit-learn's bundled digits file, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.exists() else None


def build_digits() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float64)  # [1797, 8, 8], values 0..16
    x = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(bunch.target).to(torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=DIGITS_TEST_SIZE, stratify=y.numpy(), random_state=0
    )
    train_idx_t = torch.from_numpy(train_idx).sort().values
    test_idx_t = torch.from_numpy(test_idx).sort().values
    return {
        "train_x": x[train_idx_t].contiguous(),
        "train_y": y[train_idx_t].contiguous(),
        "test_x": x[test_idx_t].contiguous(),
        "test_y": y[test_idx_t].contiguous(),
        "classes": [str(i) for i in range(10)],
    }


def _load_digits(cache_dir: Path | None) -> Dataset:
    # Importing scikit-learn's datasets takes about 1.2 s, paid by every trial process of a
    # sweep; the split tensors (115 kB) are cached once, keyed by scikit-learn's file and version.
    source = _digits_source()
    if source is None:
        tensors = build_digits()
    else:
        fingerprint = hashlib.sha256(
            f"{source_fingerprint(source)}|{version('scikit-learn')}|{DIGITS_TEST_SIZE}".encode()
        ).hexdigest()
        # Never next to the source: that is scikit-learn's installed package.
        directory = cache_dir or Path(os.environ.get("SAMTUNE_CACHE_DIR") or samtune_home()).expanduser()
        tensors = cached("digits", source, fingerprint, build_digits, directory)
    return Dataset(
        name="digits",
        train_x=tensors["train_x"],
        train_y=tensors["train_y"],
        test_x=tensors["test_x"],
        test_y=tensors["test_y"],
        classes=list(tensors["classes"]),
        cached_as=tensors.get("cached_as"),
    )


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> Dataset:
    """Load ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder:<path>`` as in-memory tensors.

    Any name may end in a class selection such as ``[0-4]`` (see the module doc).

    ``data_root`` (else ``$SAMTUNE_DATA_ROOT``) is where CIFAR is looked for (see the module doc);
    it may also be a tarball. ``cache_dir`` overrides where decoded tensors are cached (as
    ``$SAMTUNE_CACHE_DIR`` does). ``download``: None = allowed unless ``SAMTUNE_OFFLINE=1``.

    Raises ValueError for an unknown name, an ImageFolder tree that is malformed (no train/ or
    test/ split, an empty class folder, mismatched class folders, images of different sizes) or
    CIFAR classes that do not match, or a bad class selection (see `parse_dataset_name`);
    `DataNotFoundError` (a FileNotFoundError) when data is absent; `DataUnreadableError` when
    CIFAR files are there but damaged, incomplete or not the published ones.

    >>> ds = load_dataset("digits")
    >>> ds.train_x.shape, ds.train_x.dtype, ds.num_classes
    (torch.Size([1437, 1, 8, 8]), torch.uint8, 10)
    >>> load_dataset("digits[3,5-6]").classes
    ['3', '5', '6']
    """
    base, selection = parse_dataset_name(name)
    dataset = _load_base(base, data_root, cache_dir, download)
    return dataset if selection is None else select_classes(dataset, selection)


def parse_dataset_name(name: str) -> tuple[str, list[int] | None]:
    """Split ``"cifar10[0-4]"`` into ``("cifar10", [0, 1, 2, 3, 4])``; no selection gives None.

    The selection is comma-separated indices and inclusive ``a-b`` ranges, returned sorted.
    Raises ValueError for an empty or reversed range, a repeated class or a malformed selection.
    Only the name's syntax is checked here; `select_classes` checks indices against the dataset.
    """
    text = str(name).strip()
    match = re.fullmatch(r"(.*?)\[([^\[\]]*)\]", text)
    if match is None:
        if text.endswith("]") or ("[" in text and not text.lower().startswith("imagefolder:")):
            raise ValueError(
                f"malformed class selection in dataset {name!r}; expected e.g. 'cifar10[0-4]' or 'cifar100[3,7,10-19]'"
            )
        return text, None
    base, body = match.group(1).strip(), match.group(2)
    indices: list[int] = []
    for part in body.split(","):
        part = part.strip()
        bounds = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if bounds is None:
            raise ValueError(
                f"malformed class selection [{body}] in dataset {name!r}; expected class "
                "indices and ranges like [0-4] or [3,7,10-19]"
            )
        if bounds.group(3) is not None:
            indices.append(int(bounds.group(3)))
        else:
            lo, hi = int(bounds.group(1)), int(bounds.group(2))
            if hi < lo:
                raise ValueError(f"class range {part} in dataset {name!r} is reversed; write {hi}-{lo}")
            indices.extend(range(lo, hi + 1))
    if len(set(indices)) != len(indices):
        raise ValueError(f"class selection [{body}] in dataset {name!r} names a class twice")
    return base, sorted(indices)


def select_classes(dataset: Dataset, classes: Sequence[int]) -> Dataset:
    """Keep only the examples of ``classes`` (indices into ``dataset.classes``), relabelled 0..k-1.

    New label ``i`` is the ``i``-th smallest selected index; class names follow. Normalisation
    statistics are recomputed from the kept training images. Raises ValueError for an index out of
    range, a repeated index or an empty selection.
    """
    chosen = sorted(int(c) for c in classes)
    if not chosen:
        raise ValueError(f"empty class selection for dataset {dataset.name!r}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"class selection {list(classes)} names a class twice")
    bad = [c for c in chosen if not 0 <= c < dataset.num_classes]
    if bad:
        raise ValueError(
            f"dataset {dataset.name!r} has classes 0..{dataset.num_classes - 1}; selection {chosen} names {bad}"
        )
    remap = torch.full((dataset.num_classes,), -1, dtype=torch.int64)
    remap[torch.tensor(chosen)] = torch.arange(len(chosen))
    parts = {}
    for split in ("train", "test"):
        y = remap[getattr(dataset, f"{split}_y")]
        keep = (y >= 0).nonzero().flatten()
        parts[f"{split}_x"] = getattr(dataset, f"{split}_x")[keep].contiguous()
        parts[f"{split}_y"] = y[keep].contiguous()
    return Dataset(
        name=f"{dataset.name}[{_format_selection(chosen)}]", classes=[dataset.classes[c] for c in chosen], **parts
    )


def _format_selection(indices: list[int]) -> str:
    """[0,1,2,3,7] -> '0-3,7' (the name `parse_dataset_name` reads back)."""
    runs: list[str] = []
    start = prev = indices[0]
    for c in indices[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(runs)


def _load_base(
    name: str, data_root: str | os.PathLike | None, cache_dir: str | os.PathLike | None, download: bool | None
) -> Dataset:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    text = name.strip()
    key = text.lower()
    if key == "digits":
        return _load_digits(cache)
    if key in CIFAR:
        return load_cifar(key, data_root, cache, download)
    if key.startswith("imagefolder:"):
        path = Path(text.split(":", 1)[1]).expanduser()
        if not path.exists():
            raise DataNotFoundError(
                f"ImageFolder path {path} does not exist; expected a folder with "
                "train/<class>/<image> and test/<class>/<image>, or a .tar.gz of one"
            )
        tensors = load_image_tree(path, f"imagefolder-{path.name}", cache)
        return Dataset(
            name=f"imagefolder:{path}",
            train_x=tensors["train_x"],
            train_y=tensors["train_y"],
            test_x=tensors["test_x"],
            test_y=tensors["test_y"],
            classes=list(tensors["classes"]),
            cached_as=tensors.get("cached_as"),
        )
    raise ValueError(
        f"unknown dataset {name!r}; expected 'digits', 'cifar10', 'cifar100' or 'imagefolder:<path>'"
        ", optionally followed by a class selection such as [0-4]"
    )

"""Datasets as whole uint8 tensors, plus batched augmentation and normalisation.

Every dataset is held in memory as one uint8 tensor per split (`[N, C, H, W]`) and one int64
label tensor, as fast CIFAR loaders do (KellerJordan/cifar10-airbench): a training epoch is index
arithmetic and a few tensor ops on whole batches, never per-image Python or loader workers.

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
  the data. Class indices follow CIFAR's own order whatever the source.
- ``imagefolder:<path>``: any ImageFolder tree or ``.tar.gz`` of one (``train/`` plus ``test/`` or
  ``val/``); class indices follow sorted class-folder names, as in ``torchvision.datasets.ImageFolder``.
  Images are decoded to RGB and must share one size.

Any name may end in a class selection, ``cifar10[0-4]`` or ``cifar100[3,7,10-19]``: only those
classes (indices in the full dataset's order) are kept, relabelled ``0..k-1`` in ascending order
of the original index. This gives transfer pairs within one dataset (pretrain on ``cifar10[0-4]``,
finetune on ``cifar10[5-9]``).

Decoded images (ImageFolder trees, and tarballs of a tree or of the pickled CIFAR files) are
cached as one tensor file: under ``$SAMTUNE_CACHE_DIR`` if set, else next to the data when that
folder is writable, else under ``~/.cache/samtune``. The file name carries a fingerprint of the
source (path, size, modification times), and the file carries a SHA-256 of its tensors: a stale
cache is never used and a corrupt one is rebuilt. Measured on the shared 60,000-JPEG CIFAR-10
tarball (2 shared CPU cores): first decode about 6 s, cached load well under 3 s; see
``benchmarks/data.py``.
"""
from __future__ import annotations

import os
import pickle
import socket
import tarfile
import threading
import zlib
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from samtune.data.cache import _cached, _fingerprint
from samtune.data.dataset import (
    DataNotFoundError,
    Dataset,
    DataUnreadableError,
    default_data_root,
)
from samtune.data.images import _is_tarball, _load_image_tree, _norm, _read_tar

# ---------------------------------------------------------------------------------------------
# CIFAR and ImageFolder sources

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


DOWNLOAD_PROBE_S = 5.0  # how long the offline check waits for the dataset host before giving up


_CIFAR = {
    "cifar10": {
        "title": "CIFAR-10",
        "pickled": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "folders": ("cifar10-jpeg", "cifar10", "CIFAR-10-images"),
        "globs": ("*cifar10*.tar.gz", "*cifar-10*.tar.gz", "*cifar10*.tgz"),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "pickled": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "folders": ("cifar100-jpeg", "cifar100", "CIFAR-100-images"),
        "globs": ("*cifar100*.tar.gz", "*cifar-100*.tar.gz", "*cifar100*.tgz"),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


# --- CIFAR ------------------------------------------------------------------------------------

def _unpickle(blob: bytes) -> dict:
    # The canonical CIFAR files are Python pickles; torchvision reads them the same way.
    return pickle.loads(blob, encoding="latin1")


def _cifar_from_pickles(key: str, read: Callable) -> dict:
    """Tensors from the canonical pickled files; ``read(member)`` returns a file's bytes."""
    if key == "cifar10":
        train = [_unpickle(read(f"data_batch_{i}")) for i in range(1, 6)]
        test = [_unpickle(read("test_batch"))]
        classes = list(_unpickle(read("batches.meta"))["label_names"])
        label_key = "labels"
    else:
        train, test = [_unpickle(read("train"))], [_unpickle(read("test"))]
        classes = list(_unpickle(read("meta"))["fine_label_names"])
        label_key = "fine_labels"

    def stack(batches: list[dict]) -> tuple[Tensor, Tensor]:
        import numpy as np

        x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[label_key]) for b in batches])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype("int64"))

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": classes}


def _tar_has_pickles(path: Path, folder: str) -> bool:
    try:
        with tarfile.open(path) as tf:
            first = tf.next()
            return first is not None and _norm(first.name).split("/")[0] == folder
    except (tarfile.TarError, OSError):
        return False


def _cifar_candidates(key: str, root: Path) -> list[tuple[str, Path]]:
    """(kind, path) pairs to look at, in order; kind is 'pickled', 'tree' or 'tarball'."""
    spec = _CIFAR[key]
    out: list[tuple[str, Path]] = []
    if _is_tarball(root):
        return [("tarball", root)]
    out.append(("pickled", root / spec["pickled"]))
    out.append(("pickled", root))
    out.append(("tree", root))
    out += [("tree", root / f) for f in spec["folders"]]
    out.append(("tarball", root / spec["archive"]))
    out += [("tarball", root / f"{f}.tar.gz") for f in spec["folders"]]
    if root.is_dir():
        for pattern in spec["globs"]:
            for p in sorted(root.glob(pattern)):
                if key == "cifar10" and "100" in p.name:
                    continue
                out.append(("tarball", p))
    seen, unique = set(), []
    for kind, p in out:
        if (kind, p) not in seen:
            seen.add((kind, p))
            unique.append((kind, p))
    return unique


def _load_cifar(key: str, data_root: str | os.PathLike | None, cache_dir: Path | None,
                download: bool | None) -> Dataset:
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    tried: list[str] = []
    first_batch = "data_batch_1" if key == "cifar10" else "train"
    tensors = None
    for kind, path in _cifar_candidates(key, root):
        tried.append(f"{path} ({kind})")
        try:
            tensors = _read_cifar_candidate(key, kind, path, first_batch, cache_dir)
        except (OSError, EOFError, KeyError, zlib.error, tarfile.TarError, pickle.UnpicklingError) as exc:
            what = f"missing file {exc}" if isinstance(exc, (KeyError, FileNotFoundError)) else \
                f"{type(exc).__name__}: {str(exc).strip() or 'truncated'}"
            raise DataUnreadableError(f"{key} at {path} cannot be read ({what}); replace it with a whole copy "
                                      f"or remove it") from None
        if tensors is not None:
            break
    if tensors is None:
        tensors = _download_cifar(key, root, tried, download)
    return _as_cifar_dataset(key, tensors)


def _read_cifar_candidate(key: str, kind: str, path: Path, first_batch: str, cache_dir: Path | None) -> dict | None:
    """One place CIFAR may be (`_cifar_candidates`): its tensors, or None when it is not there."""
    spec = _CIFAR[key]
    if kind == "pickled" and (path / first_batch).is_file():
        return _cifar_from_pickles(key, lambda m, d=path: (d / m).read_bytes())
    if kind == "tree" and (path / "train").is_dir():
        return _load_image_tree(path, key, cache_dir)
    if kind != "tarball" or not _is_tarball(path):
        return None
    if not _tar_has_pickles(path, spec["pickled"]):
        return _load_image_tree(path, key, cache_dir, tar_root_hint=spec["folders"])

    def build() -> dict:
        files, _ = _read_tar(path)
        by_base = {_norm(n).rsplit("/", 1)[-1]: b for n, b in files.items()}
        return _cifar_from_pickles(key, lambda m: by_base[m])

    # Decompressing the 160 MB tarball costs seconds on every load; the tensor cache is read in a
    # fraction of that, as for trees and JPEG tarballs.
    return _cached(key, path, _fingerprint(path), build, cache_dir)


def _as_cifar_dataset(key: str, tensors: dict) -> Dataset:
    """Check shapes and put classes in CIFAR's own index order."""
    spec = _CIFAR[key]
    classes = list(tensors["classes"])
    expected = CIFAR10_CLASSES if key == "cifar10" else sorted(classes)
    if sorted(classes) != sorted(expected) or len(classes) != (10 if key == "cifar10" else 100):
        raise ValueError(f"{spec['title']} source has classes {classes}; expected {len(expected)} classes "
                         f"{expected if key == 'cifar10' else '(the CIFAR-100 fine labels)'}")
    train_y, test_y = tensors["train_y"], tensors["test_y"]
    if classes != expected:
        # ImageFolder sorts folder names; map each to CIFAR's index for that name.
        remap = torch.tensor([expected.index(c) for c in classes])
        train_y, test_y = remap[train_y], remap[test_y]
    for split, x in (("train", tensors["train_x"]), ("test", tensors["test_x"])):
        if tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"{spec['title']} {split} images have shape {tuple(x.shape[1:])}; expected (3, 32, 32)")
    return Dataset(name=key, train_x=tensors["train_x"], train_y=train_y, test_x=tensors["test_x"],
                   test_y=test_y, classes=list(expected))


def _host_reachable(url: str, timeout: float) -> bool:
    """Whether the URL's host accepts a TCP connection within ``timeout`` seconds.

    Runs in a daemon thread because name resolution has no timeout of its own; an offline machine
    must answer in seconds, not hang.
    """
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    port = 443 if url.startswith("https") else 80
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(ok)


def _download_cifar(key: str, root: Path, tried: list[str], download: bool | None) -> dict:
    spec = _CIFAR[key]
    if download is None:
        download = os.environ.get("SAMTUNE_OFFLINE", "").lower() not in ("1", "true", "yes")
    reason = "downloads are off (SAMTUNE_OFFLINE or download=False)"
    if download:
        if _host_reachable(spec["url"], DOWNLOAD_PROBE_S):
            import torchvision

            cls = torchvision.datasets.CIFAR10 if key == "cifar10" else torchvision.datasets.CIFAR100
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(60.0)  # a stalled transfer fails instead of hanging forever
            try:
                root.mkdir(parents=True, exist_ok=True)
                cls(str(root), train=True, download=True)
            except Exception as exc:  # noqa: BLE001 - reported with the paths below
                reason = f"download from {spec['url']} failed: {exc}"
            else:
                folder = root / spec["pickled"]
                return _cifar_from_pickles(key, lambda m: (folder / m).read_bytes())
            finally:
                socket.setdefaulttimeout(previous)
        else:
            reason = f"{spec['url']} is unreachable within {DOWNLOAD_PROBE_S:g} s (offline?)"
    listing = "\n  ".join(tried)
    raise DataNotFoundError(
        f"{spec['title']} not found, and {reason}. Paths tried:\n  {listing}\n"
        f"Supply it with --data-root DIR (or SAMTUNE_DATA_ROOT=DIR) where DIR holds one of: "
        f"{spec['pickled']}/ (the canonical pickled copy, from {spec['url']}), an ImageFolder tree "
        f"train/<class>/*.jpg + test/<class>/*.jpg, or a .tar.gz of either; DIR may also be the .tar.gz itself."
    )

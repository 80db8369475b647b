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

import fcntl
import hashlib
import os
import stat
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from samtune.data.dataset import _samtune_home

CACHE_FORMAT = "samtune-dataset-v1"


def cache_dir_for(source: Path) -> Path:
    """Where the decoded-tensor cache of ``source`` lives (see the module doc for the order)."""
    env = os.environ.get("SAMTUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    parent = source.parent
    # The owner's write bit too: root passes os.access on any folder, and a folder someone made
    # read-only (a shared dataset copy) should not grow a cache file.
    if os.access(parent, os.W_OK) and parent.stat().st_mode & stat.S_IWUSR:
        return parent
    return _samtune_home()


# --- the tensor cache -------------------------------------------------------------------------

def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in ("train_x", "train_y", "test_x", "test_y"):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(memoryview(t.numpy()).cast("B"))
    h.update("\n".join(tensors["classes"]).encode())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str) -> dict | None:
    """The cached tensors, or None when the file is missing; a bad file is reported and ignored."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a {CACHE_FORMAT} file")
        if blob.get("fingerprint") != fingerprint:
            raise ValueError("built from a different source")
        if _digest(blob) != blob.get("sha256"):
            raise ValueError("checksum mismatch")
        return blob
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a bit flip, a stale file: all rebuild
        warnings.warn(f"dataset cache {path} is unusable ({exc}); decoding the source again", stacklevel=3)
        return None


def _write_cache(path: Path, fingerprint: str, tensors: dict) -> None:
    blob = {"format": CACHE_FORMAT, "fingerprint": fingerprint, **tensors, "sha256": _digest(tensors)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {path} ({exc}); the next load decodes again",
                      stacklevel=3)


def _cached(name: str, source: Path, fingerprint: str, build: Callable[[], dict], cache_dir: Path | None) -> dict:
    """Load ``build()``'s tensors from the cache or build and cache them (one builder at a time)."""
    directory = cache_dir if cache_dir is not None else cache_dir_for(source)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:60]
    path = directory / f"{safe}-{fingerprint[:16]}.samtune.pt"
    hit = _read_cache(path, fingerprint)
    if hit is not None:
        return hit
    lock = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / f".{path.name}.lock", "w")  # noqa: SIM115 - held across the build
        # Parallel trials of one sweep would otherwise all decode the same data at once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = _read_cache(path, fingerprint)
        if hit is not None:
            return hit
    except OSError:
        lock = None
    try:
        tensors = build()
        _write_cache(path, fingerprint, tensors)
        return tensors
    finally:
        if lock is not None:
            lock.close()


def _fingerprint(source: Path, tree_dirs: Iterable[Path] = ()) -> str:
    """Path, size and modification time of a tarball, or of the class folders of a tree.

    A folder's mtime changes when files are added, removed or renamed in it; editing an image in
    place is not noticed (delete the cache file to force a rebuild).
    """
    h = hashlib.sha256(CACHE_FORMAT.encode())
    st = source.stat()
    h.update(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for d in tree_dirs:
        h.update(f"|{d}|{d.stat().st_mtime_ns}".encode())
    return h.hexdigest()

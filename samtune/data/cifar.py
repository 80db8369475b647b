"""CIFAR-10 and CIFAR-100 from local files, or downloaded by torchvision when none are there.

A data root may hold the canonical pickled copy (``cifar-10-batches-py/``, ``cifar-100-python/``),
an ImageFolder tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``) or a tarball of either; the
paths looked at are listed by `_cifar_candidates`. Class indices follow CIFAR's own order whatever
the source.

The pickled files are read by torchvision's ``CIFAR10``/``CIFAR100``, which compare each file's md5
with the published one before unpickling it: unpickling runs code, so a file that is not the
canonical one is refused with a `DataUnreadableError` naming it. A tarball of the pickles is
unpacked (tarfile's ``data`` filter) into the cache folder, read the same way, and kept only as
the tensor cache of `samtune.data.cache`.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import tarfile
import tempfile
import threading
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict
from urllib.parse import urlparse

import numpy as np
import torch

from samtune.data.cache import cache_dir_for, cached, source_fingerprint
from samtune.data.dataset import (
    DataNotFoundError,
    Dataset,
    DataUnreadableError,
    default_data_root,
)
from samtune.data.images import is_tarball, load_image_tree, norm

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


DOWNLOAD_PROBE_S = 5.0  # how long the offline check waits for the dataset host before giving up


class CifarSpec(TypedDict):
    title: str
    pickled: str  # the canonical pickled copy's folder
    archive: str
    folders: tuple[str, ...]  # ImageFolder trees, as folders or <name>.tar.gz
    globs: tuple[str, ...]
    url: str


CIFAR: dict[str, CifarSpec] = {
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


# --- the pickled files, read by torchvision ---------------------------------------------------


class _ChecksumMismatch(ValueError):
    """A canonical CIFAR file whose md5 is not the published one; it was not unpickled."""


def _reader(key: str, folder: Path | None = None) -> type[Any]:
    """torchvision's dataset class for ``key``, reading its files from ``folder``."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if key == "cifar10" else torchvision.datasets.CIFAR100
    if folder is not None and folder.name != cls.base_folder:
        # torchvision reads root/base_folder/<file>: the same files under another folder name.
        cls = type(cls.__name__, (cls,), {"base_folder": folder.name})
    return cls


def _canonical_files(cls: type[Any]) -> list[tuple[str, str]]:
    """(file name, published md5) of every file of the pickled copy, in reading order."""
    return [(name, md5) for name, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]


def cifar_from_pickles(key: str, folder: Path) -> dict:
    """Tensors from the canonical pickled files in ``folder``.

    Raises FileNotFoundError for the first missing file and `_ChecksumMismatch` for the first file
    whose md5 differs from the published one, before that file is unpickled.
    """
    cls = _reader(key, folder)
    for name, _ in _canonical_files(cls):
        if not (folder / name).is_file():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(folder / name))
    try:
        train = cls(str(folder.parent), train=True, download=False)
        test = cls(str(folder.parent), train=False, download=False)
    except RuntimeError:  # torchvision's only word for a checksum that does not match
        mismatch = _first_mismatch(cls, folder)
        if mismatch is None:
            raise
        raise _ChecksumMismatch(mismatch) from None
    return {
        "train_x": _as_nchw(train.data),
        "train_y": torch.tensor(train.targets, dtype=torch.int64),
        "test_x": _as_nchw(test.data),
        "test_y": torch.tensor(test.targets, dtype=torch.int64),
        "classes": list(train.classes),
    }


def _first_mismatch(cls: type[Any], folder: Path) -> str | None:
    """What is wrong with the first file whose md5 is not the published one, or None."""
    from torchvision.datasets.utils import check_integrity

    for name, md5 in _canonical_files(cls):
        if not check_integrity(str(folder / name), md5):
            return f"{name} is not the published file: its md5 differs from {md5}, so it was not unpickled"
    return None


def _as_nchw(images: np.ndarray) -> torch.Tensor:
    """torchvision's [N, H, W, C] uint8 array as a [N, C, H, W] tensor (a view of its pickled rows)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def extract_pickles(key: str, tarball: Path, scratch: Path) -> Path:
    """Unpack the canonical files of a tarball into ``scratch``/<folder>; return that folder.

    Only regular files with a canonical name are written, each straight into the one folder.
    tarfile's ``data`` filter refuses the archive if any member is absolute, climbs out with ``..``
    or links outside ``scratch``. Raises KeyError naming the first canonical file missing.
    """
    cls = _reader(key)
    wanted = [name for name, _ in _canonical_files(cls)]
    folder = scratch / cls.base_folder
    with tarfile.open(tarball, "r|*") as tf:
        for member in tf:
            member = tarfile.data_filter(member, str(scratch))
            name = PurePosixPath(member.name).name
            if member.isfile() and name in wanted:
                tf.extract(member.replace(name=f"{cls.base_folder}/{name}"), scratch, filter="data")
    for name in wanted:
        if not (folder / name).is_file():
            raise KeyError(name)
    return folder


def _cifar_from_tarball(key: str, path: Path, cache_dir: Path | None) -> dict:
    """Tensors of a tarball of the pickled copy, unpacked and read once, then kept in the cache."""
    directory = cache_dir if cache_dir is not None else cache_dir_for(path)

    def build() -> dict:
        # The cache folder, not /tmp: the unpacked files (180 MB) sit next to what they become.
        scratch_parent = directory if os.access(directory, os.W_OK) else None
        with tempfile.TemporaryDirectory(prefix=".unpack-", dir=scratch_parent) as scratch:
            return cifar_from_pickles(key, extract_pickles(key, path, Path(scratch)))

    # Decompressing the 160 MB tarball costs seconds on every load; the tensor cache is read in a
    # fraction of that, as for trees and JPEG tarballs.
    return cached(key, path, source_fingerprint(path), build, cache_dir)


# --- where CIFAR may be -----------------------------------------------------------------------


def _tar_has_pickles(path: Path, folder: str) -> bool:
    try:
        with tarfile.open(path) as tf:
            first = tf.next()
            return first is not None and norm(first.name).split("/")[0] == folder
    except (tarfile.TarError, OSError):
        return False


def _cifar_candidates(key: str, root: Path) -> list[tuple[str, Path]]:
    """(kind, path) pairs to look at, in order; kind is 'pickled', 'tree' or 'tarball'."""
    spec = CIFAR[key]
    out: list[tuple[str, Path]] = []
    if is_tarball(root):
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


def load_cifar(key: str, data_root: str | os.PathLike | None, cache_dir: Path | None, download: bool | None) -> Dataset:
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    tried: list[str] = []
    first_batch = "data_batch_1" if key == "cifar10" else "train"
    tensors = None
    for kind, path in _cifar_candidates(key, root):
        tried.append(f"{path} ({kind})")
        try:
            tensors = _read_cifar_candidate(key, kind, path, first_batch, cache_dir)
        except (
            OSError,
            EOFError,
            KeyError,
            zlib.error,
            tarfile.TarError,
            pickle.UnpicklingError,
            _ChecksumMismatch,
        ) as exc:
            raise DataUnreadableError(
                f"{key} at {path} cannot be read ({_unreadable_reason(exc)}); replace it with a whole copy or remove it"
            ) from None
        if tensors is not None:
            break
    if tensors is None:
        tensors = _download_cifar(key, root, tried, download)
    return _as_cifar_dataset(key, tensors)


def _unreadable_reason(exc: Exception) -> str:
    """The words for why a CIFAR copy on disk cannot be read, for `DataUnreadableError`."""
    if isinstance(exc, (KeyError, FileNotFoundError)):
        return f"missing file {exc}"
    if isinstance(exc, _ChecksumMismatch):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).strip() or 'truncated'}"


def _read_cifar_candidate(key: str, kind: str, path: Path, first_batch: str, cache_dir: Path | None) -> dict | None:
    """One place CIFAR may be (`_cifar_candidates`): its tensors, or None when it is not there."""
    spec = CIFAR[key]
    if kind == "pickled" and (path / first_batch).is_file():
        return cifar_from_pickles(key, path)
    if kind == "tree" and (path / "train").is_dir():
        return load_image_tree(path, key, cache_dir)
    if kind != "tarball" or not is_tarball(path):
        return None
    if not _tar_has_pickles(path, spec["pickled"]):
        return load_image_tree(path, key, cache_dir, tar_root_hint=spec["folders"])
    return _cifar_from_tarball(key, path, cache_dir)


def _as_cifar_dataset(key: str, tensors: dict) -> Dataset:
    """Check shapes and put classes in CIFAR's own index order."""
    spec = CIFAR[key]
    classes = list(tensors["classes"])
    expected = CIFAR10_CLASSES if key == "cifar10" else sorted(classes)
    if sorted(classes) != sorted(expected) or len(classes) != (10 if key == "cifar10" else 100):
        raise ValueError(
            f"{spec['title']} source has classes {classes}; expected {len(expected)} classes "
            f"{expected if key == 'cifar10' else '(the CIFAR-100 fine labels)'}"
        )
    train_y, test_y = tensors["train_y"], tensors["test_y"]
    if classes != expected:
        # ImageFolder sorts folder names; map each to CIFAR's index for that name.
        remap = torch.tensor([expected.index(c) for c in classes])
        train_y, test_y = remap[train_y], remap[test_y]
    for split, x in (("train", tensors["train_x"]), ("test", tensors["test_x"])):
        if tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"{spec['title']} {split} images have shape {tuple(x.shape[1:])}; expected (3, 32, 32)")
    return Dataset(
        name=key,
        train_x=tensors["train_x"],
        train_y=train_y,
        test_x=tensors["test_x"],
        test_y=test_y,
        classes=list(expected),
        cached_as=tensors.get("cached_as"),
    )


def _host_reachable(url: str, timeout: float) -> bool:
    """Whether the URL's host accepts a TCP connection within ``timeout`` seconds.

    Runs in a daemon thread because name resolution has no timeout of its own; an offline machine
    must answer in seconds, not hang.
    """
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
    spec = CIFAR[key]
    if download is None:
        download = os.environ.get("SAMTUNE_OFFLINE", "").lower() not in ("1", "true", "yes")
    reason = "downloads are off (SAMTUNE_OFFLINE or download=False)"
    if download:
        if _host_reachable(spec["url"], DOWNLOAD_PROBE_S):
            cls = _reader(key)
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(60.0)  # a stalled transfer fails instead of hanging forever
            try:
                root.mkdir(parents=True, exist_ok=True)
                cls(str(root), train=True, download=True)
            except Exception as exc:  # noqa: BLE001 - reported with the paths below
                reason = f"download from {spec['url']} failed: {exc}"
            else:
                return cifar_from_pickles(key, root / spec["pickled"])
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

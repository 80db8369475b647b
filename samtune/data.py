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
import io
import os
import pickle
import re
import socket
import stat
import tarfile
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "Dataset",
    "DataUnreadableError",
    "load_dataset",
    "to_float",
    "augment_batch",
    "DATASET_STATS",
    "CIFAR10_CLASSES",
    "DataNotFoundError",
    "channel_stats",
    "cache_dir_for",
    "parse_dataset_name",
    "select_classes",
]

#: Dataset names `load_dataset` knows besides ``imagefolder:<path>`` (any may carry ``[classes]``).
DATASETS = ("digits", "cifar10", "cifar100")

# Per-channel mean/std of the training split, in the 0..1 pixel scale. CIFAR values are the usual
# published ones; `Dataset.mean`/`std` fall back to computing them from the training split.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

DIGITS_TEST_SIZE = 360  # of 1,797: leaves 1,437 for training (an 80/20 split)


@dataclass
class Dataset:
    """One dataset, both splits, in memory.

    Images are uint8 ``[N, C, H, W]``, labels int64 ``[N]`` in ``0..num_classes-1``; ``classes[i]``
    names label ``i``. Normalise batches with ``to_float(x, dataset.mean, dataset.std)``.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    _stats: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def mean(self) -> tuple[float, ...]:
        return self._normalisation()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._normalisation()[1]

    def _normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self._stats is None:
            known = DATASET_STATS.get(self.name)
            self._stats = known if known is not None else channel_stats(self.train_x)
        return self._stats


def channel_stats(x: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``[N, C, H, W]`` in the 0..1 scale.

    Accumulates in float64 over chunks so large datasets need no full float copy. A channel with
    zero spread gets std 1.0 (normalising by zero would give infinities).
    Raises ValueError for an empty or non-4D tensor.
    """
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected non-empty images [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def to_float(x_uint8: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 images ``[N, C, H, W]`` (or ``[C, H, W]``) -> float32 ``(x/255 - mean) / std``.

    ``mean``/``std`` are per channel in the 0..1 scale (length C, or one value for all channels).
    Runs on the tensor's device. Raises ValueError when their length does not match C.
    """
    c = x_uint8.shape[-3]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).reshape(-1)
    if mean_t.numel() not in (1, c) or std_t.numel() not in (1, c):
        raise ValueError(
            f"mean/std need 1 or {c} values (one per channel), got {mean_t.numel()} and {std_t.numel()}"
        )
    # Fold /255 into the affine map: one multiply-add over the batch instead of three passes.
    scale = (1.0 / (255.0 * std_t)).reshape(-1, 1, 1)
    shift = (-mean_t / std_t).reshape(-1, 1, 1)
    return x_uint8.to(torch.float32).mul_(scale).add_(shift)


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> Tensor:
    """Random crop with zero padding and random horizontal flip, on a whole batch at once.

    ``x`` is ``[N, C, H, W]`` (any dtype, any device): each image is zero-padded by ``pad`` pixels on
    every side and a random ``H x W`` window is taken (the torchvision ``RandomCrop(H, padding=pad)``
    convention used for CIFAR), then mirrored left-right with probability 1/2. Randomness comes only
    from ``generator`` (on CPU or on ``x``'s device), so a seeded generator gives the same batch.
    ``pad == 0`` skips the crop. Returns a new tensor; ``x`` is not modified.
    Raises ValueError for a non-4D input or a negative ``pad``.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects [N, C, H, W], got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, _, h, w = x.shape
    gen_device = generator.device
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [N, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [N, 1, W]
        batch = torch.arange(n, device=x.device)[:, None, None]
        # One gather for the whole batch: advanced indices give [N, H, W, C]; back to NCHW.
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
    else:
        x = x.clone()
    if flip:
        mirror = torch.rand(n, generator=generator, device=gen_device).to(x.device) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def _digits_source() -> Path | None:
    """scikit-learn's bundled digits file, found without importing scikit-learn."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.exists() else None


def _build_digits() -> dict:
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
    return {"train_x": x[train_idx_t].contiguous(), "train_y": y[train_idx_t].contiguous(),
            "test_x": x[test_idx_t].contiguous(), "test_y": y[test_idx_t].contiguous(),
            "classes": [str(i) for i in range(10)]}


def _load_digits(cache_dir: Path | None) -> Dataset:
    # Importing scikit-learn's datasets takes about 1.2 s, paid by every trial process of a
    # sweep; the split tensors (115 kB) are cached once, keyed by scikit-learn's file and version.
    source = _digits_source()
    if source is None:
        tensors = _build_digits()
    else:
        from importlib.metadata import version

        fingerprint = hashlib.sha256(f"{_fingerprint(source)}|{version('scikit-learn')}|"
                                     f"{DIGITS_TEST_SIZE}".encode()).hexdigest()
        # Never next to the source: that is scikit-learn's installed package.
        directory = cache_dir or Path(os.environ.get("SAMTUNE_CACHE_DIR") or _samtune_home()).expanduser()
        tensors = _cached("digits", source, fingerprint, _build_digits, directory)
    return Dataset(name="digits", train_x=tensors["train_x"], train_y=tensors["train_y"],
                   test_x=tensors["test_x"], test_y=tensors["test_y"], classes=list(tensors["classes"]))


# ---------------------------------------------------------------------------------------------
# CIFAR and ImageFolder sources

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CACHE_FORMAT = "samtune-dataset-v1"
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


class DataNotFoundError(FileNotFoundError):
    """The dataset is not on disk and could not be downloaded; the message says where we looked."""


class DataUnreadableError(ValueError):
    """The dataset is on disk but cannot be read: a truncated or corrupt archive, a missing file."""


def _samtune_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samtune"


def default_data_root() -> Path:
    """``$SAMTUNE_DATA_ROOT`` if set, else ``~/.cache/samtune/data`` (where downloads go)."""
    env = os.environ.get("SAMTUNE_DATA_ROOT")
    return Path(env).expanduser() if env else _samtune_home() / "data"


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


# --- reading trees: a directory on disk or a tarball read in one pass ---------------------------

def _is_tarball(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def _read_tar(path: Path) -> tuple[dict[str, bytes], set[str]]:
    """All regular files (name -> bytes) and directory names in a (gzipped) tarball.

    Parses ustar headers directly: `tarfile` spends about 4 s of Python per 60,000 members, this
    about 0.5 s. Anything beyond plain ustar, GNU long names and pax paths falls back to `tarfile`.
    """
    raw = path.read_bytes()
    data = zlib.decompress(raw, wbits=47) if raw[:2] == b"\x1f\x8b" else raw  # 47: gzip or zlib
    try:
        return _parse_ustar(data)
    except _UnsupportedTar:
        files: dict[str, bytes] = {}
        dirs: set[str] = set()
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf:
                if m.isfile():
                    files[m.name] = data[m.offset_data : m.offset_data + m.size]
                elif m.isdir():
                    dirs.add(m.name.rstrip("/"))
        return files, dirs


class _UnsupportedTar(Exception):
    pass


def _parse_ustar(data: bytes) -> tuple[dict[str, bytes], set[str]]:
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    off, end = 0, len(data)
    long_name: str | None = None
    while off + 512 <= end:
        header = data[off : off + 512]
        if header == b"\0" * 512:
            break
        size_field = header[124:136]
        if size_field[:1] and size_field[0] & 0x80:
            raise _UnsupportedTar("base-256 size")
        size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        body = off + 512
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and prefix:
            name = f"{prefix}/{name}"
        if long_name is not None:
            name, long_name = long_name, None
        if kind == b"L":  # GNU long name for the next member
            long_name = data[body : body + size].split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"x":  # pax header: only 'path' matters here
            for record in data[body : body + size].decode("utf-8", "replace").splitlines():
                key_value = record.split(" ", 1)[-1]
                if key_value.startswith("path="):
                    long_name = key_value[5:]
                elif key_value.startswith("size="):
                    raise _UnsupportedTar("pax size")
        elif kind in (b"0", b"\0", b"7"):
            files[name] = data[body : body + size]
        elif kind == b"5":
            dirs.add(name.rstrip("/"))
        elif kind not in (b"g", b"1", b"2"):
            raise _UnsupportedTar(f"member type {kind!r}")
        off = body + (size + 511) // 512 * 512
    return files, dirs


def _norm(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _find_split_roots(names: Iterable[str]) -> list[str]:
    """Prefixes P such that ``P/train/<class>/<file>`` appears among ``names``."""
    roots = set()
    for name in names:
        parts = _norm(name).split("/")
        if len(parts) >= 3 and parts[-3] == "train":
            roots.add("/".join(parts[:-3]))
    return sorted(roots)


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _tree_from_tar(files: dict[str, bytes], dirs: set[str], root: str, source: Path
                   ) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    """{split: {class: [(name, bytes), ...]}} for the ImageFolder tree under ``root`` in a tarball."""
    base = f"{root}/" if root else ""
    tree: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    for name in sorted(files):
        rel = _norm(name)
        if not rel.startswith(base):
            continue
        parts = rel[len(base):].split("/")
        if len(parts) == 3 and parts[0] in ("train", "test", "val") and _is_image(parts[2]):
            tree.setdefault(parts[0], {}).setdefault(parts[1], []).append((rel, files[name]))
    for d in dirs:  # directories with no images still count as (empty) classes
        parts = _norm(d)[len(base):].split("/") if _norm(d).startswith(base) else []
        if len(parts) == 2 and parts[0] in ("train", "test", "val") and not parts[1].startswith("."):
            tree.setdefault(parts[0], {}).setdefault(parts[1], [])
    return tree


def _tree_from_dir(root: Path) -> dict[str, dict[str, list[Path]]]:
    tree: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "test", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        tree[split] = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            tree[split][class_dir.name] = sorted(
                (Path(e.path) for e in os.scandir(class_dir) if e.is_file() and _is_image(e.name)),
                key=lambda p: p.name,
            )
    return tree


def _check_tree(tree: dict[str, dict[str, list]], where: str) -> tuple[str, list[str]]:
    """Validate train/test class folders; return (test split name, sorted class names)."""
    if "train" not in tree:
        raise ValueError(f"{where}: no 'train/<class>/' folders found; expected an ImageFolder tree "
                         "train/<class>/<image> and test/<class>/<image> (or val/)")
    test_split = "test" if "test" in tree else "val" if "val" in tree else None
    if test_split is None:
        raise ValueError(f"{where}: has train/ but no test/ or val/ split")
    classes = sorted(tree["train"])
    if not classes:
        raise ValueError(f"{where}: train/ holds no class folders")
    if sorted(tree[test_split]) != classes:
        raise ValueError(f"{where}: class folders differ between train/ ({classes}) and "
                         f"{test_split}/ ({sorted(tree[test_split])})")
    for split in ("train", test_split):
        for c in classes:
            if not tree[split][c]:
                raise ValueError(f"{where}: class folder {split}/{c}/ holds no images "
                                 f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
    return test_split, classes


# --- decoding ---------------------------------------------------------------------------------

def _decode_images(blobs: list[bytes], names: list[str]) -> Tensor:
    """Decode encoded images to one uint8 [N, 3, H, W] tensor.

    JPEGs go through ``torchvision.io.decode_jpeg`` in batches (libjpeg-turbo, no per-image Python
    object churn: about 4x faster than PIL here, bit-identical output); other formats go through
    ``decode_image`` and then PIL. Raises ValueError naming the first image whose size differs.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[Tensor | None] = [None] * len(blobs)
    jpeg_idx = [i for i, b in enumerate(blobs) if b[:2] == b"\xff\xd8"]
    chunk = 4096
    for start in range(0, len(jpeg_idx), chunk):
        idx = jpeg_idx[start : start + chunk]
        tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in idx]
        try:
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB)
        except RuntimeError:
            decoded = [_decode_one(blobs[i], names[i]) for i in idx]
        for i, img in zip(idx, decoded):
            out[i] = img
    for i, img in enumerate(out):
        if img is None:
            out[i] = _decode_one(blobs[i], names[i])
    shape = out[0].shape if out else None
    for i, img in enumerate(out):
        if img.shape != shape:
            raise ValueError(f"image {names[i]} has shape {tuple(img.shape)} (C, H, W) but {names[0]} has "
                             f"{tuple(shape)}; all images of a dataset must share one size")
    return torch.stack(out) if out else torch.empty(0, 3, 0, 0, dtype=torch.uint8)


def _decode_one(blob: bytes, name: str) -> Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    try:
        import numpy as np
        from PIL import Image

        arr = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the same thing here
        raise ValueError(f"cannot decode image {name}: {exc}") from exc


def _decode_tree(tree: dict, test_split: str, classes: list[str], read: Callable) -> dict:
    result: dict = {"classes": classes}
    for split, key in (("train", "train"), (test_split, "test")):
        blobs, names, labels = [], [], []
        for label, c in enumerate(classes):
            for item in tree[split][c]:
                name, blob = read(item)
                names.append(name)
                blobs.append(blob)
                labels.append(label)
        result[f"{key}_x"] = _decode_images(blobs, names)
        result[f"{key}_y"] = torch.tensor(labels, dtype=torch.int64)
    return result


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


# --- ImageFolder sources ---------------------------------------------------------------------

def _load_image_tree(path: Path, name: str, cache_dir: Path | None,
                     tar_root_hint: tuple[str, ...] = ()) -> dict:
    """Tensors of an ImageFolder tree at ``path`` (a directory or a tarball holding one)."""
    if _is_tarball(path):
        def build() -> dict:
            files, dirs = _read_tar(path)
            roots = _find_split_roots(files)
            if not roots:
                raise ValueError(f"{path}: no ImageFolder tree inside (expected members like "
                                 "<root>/train/<class>/<image> and <root>/test/<class>/<image>)")
            if len(roots) > 1:
                preferred = [r for r in roots if r.rsplit("/", 1)[-1] in tar_root_hint]
                if len(preferred) != 1:
                    raise ValueError(f"{path}: holds several ImageFolder trees {roots}; unpack the one wanted")
                roots = preferred
            tree = _tree_from_tar(files, dirs, roots[0], path)
            test_split, classes = _check_tree(tree, f"{path}:{roots[0] or '/'}")
            return _decode_tree(tree, test_split, classes, read=lambda item: item)

        return _cached(name, path, _fingerprint(path), build, cache_dir)

    tree = _tree_from_dir(path)
    test_split, classes = _check_tree(tree, str(path))
    class_dirs = [path / split / c for split in ("train", test_split) for c in classes]

    def build_dir() -> dict:
        return _decode_tree(tree, test_split, classes, read=lambda p: (str(p), p.read_bytes()))

    return _cached(name, path.resolve(), _fingerprint(path, class_dirs), build_dir, cache_dir)


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


def load_dataset(name: str, data_root: str | os.PathLike | None = None, *,
                 cache_dir: str | os.PathLike | None = None, download: bool | None = None) -> Dataset:
    """Load ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder:<path>`` as in-memory tensors.

    Any name may end in a class selection such as ``[0-4]`` (see the module doc).

    ``data_root`` (else ``$SAMTUNE_DATA_ROOT``) is where CIFAR is looked for (see the module doc);
    it may also be a tarball. ``cache_dir`` overrides where decoded tensors are cached (as
    ``$SAMTUNE_CACHE_DIR`` does). ``download``: None = allowed unless ``SAMTUNE_OFFLINE=1``.

    Raises ValueError for an unknown name, an ImageFolder tree that is malformed (no train/ or
    test/ split, an empty class folder, mismatched class folders, images of different sizes) or
    CIFAR classes that do not match, or a bad class selection (see `parse_dataset_name`);
    `DataNotFoundError` (a FileNotFoundError) when data is absent.
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
            raise ValueError(f"malformed class selection in dataset {name!r}; expected e.g. 'cifar10[0-4]' "
                             "or 'cifar100[3,7,10-19]'")
        return text, None
    base, body = match.group(1).strip(), match.group(2)
    indices: list[int] = []
    for part in body.split(","):
        part = part.strip()
        bounds = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if bounds is None:
            raise ValueError(f"malformed class selection [{body}] in dataset {name!r}; expected class "
                             "indices and ranges like [0-4] or [3,7,10-19]")
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
        raise ValueError(f"dataset {dataset.name!r} has classes 0..{dataset.num_classes - 1}; "
                         f"selection {chosen} names {bad}")
    remap = torch.full((dataset.num_classes,), -1, dtype=torch.int64)
    remap[torch.tensor(chosen)] = torch.arange(len(chosen))
    parts = {}
    for split in ("train", "test"):
        y = remap[getattr(dataset, f"{split}_y")]
        keep = (y >= 0).nonzero().flatten()
        parts[f"{split}_x"] = getattr(dataset, f"{split}_x")[keep].contiguous()
        parts[f"{split}_y"] = y[keep].contiguous()
    return Dataset(name=f"{dataset.name}[{_format_selection(chosen)}]", classes=[dataset.classes[c] for c in chosen],
                   **parts)


def _format_selection(indices: list[int]) -> str:
    """[0,1,2,3,7] -> '0-3,7' (the name `parse_dataset_name` reads back)."""
    runs: list[str] = []
    start = prev = indices[0]
    for c in indices[1:] + [None]:  # type: ignore[list-item]
        if c is not None and c == prev + 1:
            prev = c
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(runs)


def _load_base(name: str, data_root: str | os.PathLike | None, cache_dir: str | os.PathLike | None,
               download: bool | None) -> Dataset:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    text = name.strip()
    key = text.lower()
    if key == "digits":
        return _load_digits(cache)
    if key in _CIFAR:
        return _load_cifar(key, data_root, cache, download)
    if key.startswith("imagefolder:"):
        path = Path(text.split(":", 1)[1]).expanduser()
        if not path.exists():
            raise DataNotFoundError(f"ImageFolder path {path} does not exist; expected a folder with "
                                    "train/<class>/<image> and test/<class>/<image>, or a .tar.gz of one")
        tensors = _load_image_tree(path, f"imagefolder-{path.name}", cache)
        return Dataset(name=f"imagefolder:{path}", train_x=tensors["train_x"], train_y=tensors["train_y"],
                       test_x=tensors["test_x"], test_y=tensors["test_y"], classes=list(tensors["classes"]))
    raise ValueError(f"unknown dataset {name!r}; expected 'digits', 'cifar10', 'cifar100' or 'imagefolder:<path>'"
                     ", optionally followed by a class selection such as [0-4]")

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

import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor

from samtune.data.cache import _cached, _fingerprint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


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

"""The on-disk cache of decoded datasets: one verified tensor file per source.

Decoded images (ImageFolder trees, tarballs of a tree or of the pickled CIFAR files, and the
digits split) are cached as one tensor file: under ``$SAMTUNE_CACHE_DIR`` if set, else next to the
data when that folder is writable, else under ``~/.cache/samtune``. The file name carries a
fingerprint of the source (path, size, modification times), and the file carries a SHA-256 of its
tensors: a stale cache is never used and a corrupt one is rebuilt. Parallel loads of one source
wait for a single builder. Measured on the shared 60,000-JPEG CIFAR-10 tarball (2 shared CPU
cores): first decode about 6 s, cached load well under 3 s; see ``benchmarks/data.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from samtune.data.dataset import CachedSource, samtune_home

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
    return samtune_home()


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


def _write_cache(path: Path, fingerprint: str, tensors: dict, digest: str) -> None:
    blob = {"format": CACHE_FORMAT, "fingerprint": fingerprint, **tensors, "sha256": digest}
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # Owner-only, like everything else samtune writes (it is the dataset, decoded).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {path} ({exc}); the next load decodes again", stacklevel=3)


def cached(name: str, source: Path, fingerprint: str, build: Callable[[], dict], cache_dir: Path | None) -> dict:
    """Load ``build()``'s tensors from the cache or build and cache them (one builder at a time).

    The tensors come with ``cached_as``, a `CachedSource` naming the cache file, the fingerprint
    and the tensors' SHA-256 (also when the file could not be written: then nothing is beside it)."""
    directory = cache_dir if cache_dir is not None else cache_dir_for(source)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:60]
    path = directory / f"{safe}-{fingerprint[:16]}.samtune.pt"
    hit = _read_cache(path, fingerprint)
    if hit is not None:
        return {**hit, "cached_as": CachedSource(path, fingerprint, hit["sha256"])}
    lock = None
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = open(directory / f".{path.name}.lock", "w")  # noqa: SIM115 - held across the build
        # Parallel trials of one sweep would otherwise all decode the same data at once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = _read_cache(path, fingerprint)
        if hit is not None:
            return {**hit, "cached_as": CachedSource(path, fingerprint, hit["sha256"])}
    except OSError:
        lock = None
    try:
        tensors = build()
        digest = _digest(tensors)
        _write_cache(path, fingerprint, tensors, digest)
        return {**tensors, "cached_as": CachedSource(path, fingerprint, digest)}
    finally:
        if lock is not None:
            lock.close()


def source_fingerprint(source: Path, tree_dirs: Iterable[Path] = ()) -> str:
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

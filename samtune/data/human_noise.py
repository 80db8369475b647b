"""Human label noise: CIFAR-10N and CIFAR-100N, and synthetic twins of it.

CIFAR-10N and CIFAR-100N (Wei et al., "Learning with Noisy Labels Revisited: A Study Using
Real-World Human Annotations", ICLR 2022) give every CIFAR training image the labels of human
annotators. Their errors are structured: confusable classes, and hard images more often than
easy ones. Two noise kinds come from each label set:

- ``human:<set>``: the training labels are the annotators' (``aggre``, ``random1``-``random3``,
  ``worst`` for CIFAR-10N; ``noisy`` for CIFAR-100N). The noise rate is the file's own, measured
  against its clean labels (`HUMAN_NOISE_RATES`), not a setting.
- ``twin:<set>``: synthetic noise with the same per-class transition matrix as ``human:<set>``
  (estimated from the file): of the ``n_c`` examples of class ``c``, ``T[c, j] * n_c`` (largest
  remainders rounding) get label ``j``, chosen at random. Same matrix, same rate, but which image
  is mislabeled no longer depends on the image: the comparison CIFAR-N was made for.

The label files (``CIFAR-10_human.pt``, ``CIFAR-100_human.pt``) are looked for in the data root
(the folder, or the folder of a tarball given as data root). They are pickles: their md5 is
compared with the published one before they are read, and they are read with
``torch.load(weights_only=True)`` allowing only numpy's array reconstruction.

The labels are in the order of the canonical pickled training set (what torchvision's readers
give). An ImageFolder copy (``train/<class>/NNNN.jpg``) is mapped by rank within class: canonical
image ``i`` is the ``r``-th image of its class in the canonical order, and the ``r``-th file of its
class folder. That mapping is only used after `check_mapping` confirms it from the images.

The check costs about 2 s, and every trial process would pay it. A pass is recorded beside the
tensor cache file the images were read from (`samtune.data.cache`), keyed by the source's
fingerprint, the tensors' SHA-256, the label file's md5 and the threshold: a later process with
the same images skips it, a changed copy (another fingerprint, other tensors) is checked again.
A failure is not recorded (`record_check` says why).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from samtune.data.dataset import (
    CachedSource,
    DataNotFoundError,
    Dataset,
    DataUnreadableError,
    default_data_root,
)


@dataclass(frozen=True)
class HumanLabelFile:
    """One published file of human labels: where it is, its digest and which label sets it holds."""

    title: str  # e.g. "CIFAR-10N"
    file: str
    md5: str
    sets: dict[str, str]  # kind name -> key in the file
    #: Labels that differ from the clean ones, per set, in the published file (of 50,000).
    flips: dict[str, int]
    num_classes: int


#: The published CIFAR-N files, by base dataset name.
HUMAN_LABEL_FILES: dict[str, HumanLabelFile] = {
    "cifar10": HumanLabelFile(
        title="CIFAR-10N",
        file="CIFAR-10_human.pt",
        md5="96644db5574813cae939af5f7f2a0aec",
        sets={
            "aggre": "aggre_label",
            "random1": "random_label1",
            "random2": "random_label2",
            "random3": "random_label3",
            "worst": "worse_label",
        },
        flips={"aggre": 4505, "random1": 8617, "random2": 9061, "random3": 8820, "worst": 20104},
        num_classes=10,
    ),
    "cifar100": HumanLabelFile(
        title="CIFAR-100N",
        file="CIFAR-100_human.pt",
        md5="a67b45c1d7992051865b5c755bd68bb1",
        sets={"noisy": "noisy_label"},
        flips={"noisy": 20100},
        num_classes=100,
    ),
}

TRAIN_SIZE = 50_000  # every CIFAR-N label set covers the whole CIFAR training set

#: Every human kind and its twin, as `label_noise_kind` takes them.
HUMAN_NOISE_KINDS = tuple(f"human:{s}" for spec in HUMAN_LABEL_FILES.values() for s in spec.sets)
TWIN_NOISE_KINDS = tuple(f"twin:{s}" for spec in HUMAN_LABEL_FILES.values() for s in spec.sets)

#: Each kind's noise rate: the file's labels that differ from its clean ones (twins: the same).
HUMAN_NOISE_RATES: dict[str, float] = {
    f"{mode}:{s}": n / TRAIN_SIZE
    for spec in HUMAN_LABEL_FILES.values()
    for s, n in spec.flips.items()
    for mode in ("human", "twin")
}

# numpy's array rebuilder, which numpy 2 keeps under numpy._core; the files name numpy 1's path.
_RECONSTRUCT = np._core.multiarray._reconstruct  # type: ignore[attr-defined]

# Each dataset's checked mapping, by label file: the check costs seconds, and a sweep's checks
# and dataset records ask for it once per cell.
# By the images' id, with a weak reference to tell a reused id from the same tensor (tensors
# compare elementwise, so they cannot key a WeakKeyDictionary).
_ALIGNED: dict[int, tuple[weakref.ref[Tensor], dict[str, Tensor]]] = {}

#: How far above a shuffled mapping the images must agree with the human confusions (z-score).
MAPPING_MIN_Z = 5.0


def is_human_kind(kind: object) -> bool:
    """Whether ``kind`` is a ``human:`` or ``twin:`` noise kind (its rate comes from a file)."""
    return isinstance(kind, str) and kind in HUMAN_NOISE_RATES


def label_file_for(kind: str) -> tuple[str, HumanLabelFile, str]:
    """``(base dataset, file spec, set name)`` of a ``human:``/``twin:`` kind; ValueError if unknown."""
    mode, _, name = kind.partition(":")
    for base, spec in HUMAN_LABEL_FILES.items():
        if mode in ("human", "twin") and name in spec.sets:
            return base, spec, name
    raise ValueError(f"unknown human label noise kind {kind!r}; expected one of {HUMAN_NOISE_KINDS + TWIN_NOISE_KINDS}")


def kind_title(kind: str) -> str:
    """What a cell of ``kind`` is called: ``"CIFAR-10N aggre, 9.0%"`` (twins: ``"... (synthetic twin)"``).

    >>> kind_title("human:aggre"), kind_title("twin:worst")
    ('CIFAR-10N aggre, 9.0%', 'CIFAR-10N worst, 40.2% (synthetic twin)')
    """
    _, spec, name = label_file_for(kind)
    text = f"{spec.title} {name}, {100 * HUMAN_NOISE_RATES[kind]:.1f}%"
    return text + " (synthetic twin)" if kind.startswith("twin:") else text


def find_label_file(spec: HumanLabelFile, data_root: str | os.PathLike | None) -> Path:
    """The label file under ``data_root`` (its folder when it is a tarball; None: the default root).

    Raises DataNotFoundError naming where it looked and where the file comes from."""
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    folders = [root] if root.is_dir() else [root.parent]
    for folder in folders:
        if (folder / spec.file).is_file():
            return folder / spec.file
    raise DataNotFoundError(
        f"{spec.title} labels not found: no {spec.file} in {', '.join(map(str, folders))}; put the file "
        "from the UCSC-REAL/cifar-10-100n repository (data/) there, or point --data-root at its folder"
    )


def read_label_file(path: Path, spec: HumanLabelFile) -> dict[str, Tensor]:
    """The label sets of ``path`` (``clean`` and each set of ``spec``) as int64 tensors.

    The md5 is checked before anything is unpickled, and unpickling allows only numpy arrays.
    Raises DataUnreadableError for another file, or one whose arrays are not 50,000 labels in
    ``0..num_classes-1``."""
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != spec.md5:
        raise DataUnreadableError(
            f"{path} is not the published {spec.title} file: its md5 is {digest}, expected {spec.md5}; "
            "it was not unpickled"
        )
    # The file names numpy 1's path for the array rebuilder; only these globals may be built.
    allowed: list[Any] = [
        (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype("int64")),
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            raw = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001  any unpickling failure is the same answer
        raise DataUnreadableError(f"{path} cannot be read as {spec.title} labels: {str(exc).splitlines()[0]}") from None
    out = {}
    for name, key in {"clean": "clean_label", **spec.sets}.items():
        values = raw.get(key) if isinstance(raw, dict) else None
        labels = torch.as_tensor(np.asarray(values)) if values is not None else None
        if labels is None or labels.shape != (TRAIN_SIZE,) or labels.min() < 0 or labels.max() >= spec.num_classes:
            raise DataUnreadableError(f"{path}: {key!r} is not {TRAIN_SIZE} labels in 0..{spec.num_classes - 1}")
        out[name] = labels.to(torch.int64)
    return out


def transition_matrix(clean: Tensor, noisy: Tensor, num_classes: int) -> Tensor:
    """``T[i, j]``: the share of class ``i``'s examples labelled ``j`` (rows sum to 1; an absent
    class has an identity row).

    >>> transition_matrix(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2)
    tensor([[0.5000, 0.5000],
            [0.0000, 1.0000]], dtype=torch.float64)
    """
    counts = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    counts.index_put_((clean, noisy), torch.ones(len(clean), dtype=torch.float64), accumulate=True)
    rows = counts.sum(1, keepdim=True)
    return torch.where(rows > 0, counts / rows.clamp(min=1), torch.eye(num_classes, dtype=torch.float64))


def twin_labels(labels: Tensor, matrix: Tensor, seed: int) -> Tensor:
    """Synthetic noise with transition matrix ``matrix``: of the ``n_c`` examples of class ``c``,
    ``matrix[c, j] * n_c`` (rounded by largest remainders, so each class's counts add up) get label
    ``j``, which ones drawn at random with ``seed``. ``labels`` is not modified."""
    gen = torch.Generator().manual_seed(int(seed))
    noisy = labels.clone()
    for c in range(matrix.shape[0]):
        members = (labels == c).nonzero().flatten()
        if not len(members):
            continue
        want = matrix[c] * len(members)
        counts = want.floor().to(torch.int64)
        short = len(members) - int(counts.sum())
        counts[torch.argsort(want - counts, descending=True, stable=True)[:short]] += 1
        targets = torch.repeat_interleave(torch.arange(matrix.shape[0]), counts)
        noisy[members[torch.randperm(len(members), generator=gen)]] = targets
    return noisy


@dataclass(frozen=True)
class MappingCheck:
    """How well the images explain the human labels' confusions, against shuffled mappings."""

    statistic: float  # mean log-probability a pixel model gives the human label, among its errors
    null_mean: float  # the same, with the human labels shuffled within each clean class
    null_std: float

    @property
    def z(self) -> float:
        """How many null standard deviations the statistic lies above the shuffled mappings'."""
        return (self.statistic - self.null_mean) / max(self.null_std, 1e-12)


def check_mapping(images: Tensor, clean: Tensor, noisy: Tensor, shuffles: int = 30, seed: int = 0) -> MappingCheck:
    """Whether ``images[i]`` is the image that got labels ``clean[i]``/``noisy[i]``.

    A ridge classifier on 8x8 average-pooled pixels is fitted to the clean labels; among the
    examples whose human label differs from the clean one, the statistic is the mean log-probability
    it gives the human label among the other classes. People mislabel an image as the class it
    looks like, so with the right images it lies far above what the same labels shuffled within
    each clean class give (the images no longer belong to them). On CIFAR-10 (50,000 images) this
    takes about 2 s on one core; the right mapping lies 12-15 null standard deviations above.
    """
    n, k = len(clean), int(max(clean.max(), noisy.max())) + 1
    x = F.avg_pool2d(images.float() / 255.0, max(1, images.shape[-1] // 8)).flatten(1)
    x = torch.cat([(x - x.mean(0)) / (x.std(0) + 1e-6), torch.ones(n, 1)], 1)
    weights = torch.linalg.solve(x.T @ x + 10.0 * torch.eye(x.shape[1]), x.T @ F.one_hot(clean, k).float())
    scores = x @ weights
    wrong = (noisy != clean).nonzero().flatten()
    scores = scores[wrong]
    scores[torch.arange(len(wrong)), clean[wrong]] = -float("inf")
    # A sharper softmax of the ridge scores: their spread is a fraction of a unit.
    logp = torch.log_softmax(5.0 * scores, 1)
    cw, nw = clean[wrong], noisy[wrong]
    rows = torch.arange(len(wrong))
    statistic = float(logp[rows, nw].mean())
    gen = torch.Generator().manual_seed(seed)
    grouped = torch.argsort(cw, stable=True)
    nulls = []
    for _ in range(shuffles):
        # Sorting by class plus a random fraction shuffles within each class only.
        shuffled = torch.argsort(cw.double() + 0.5 * torch.rand(len(cw), generator=gen, dtype=torch.float64))
        perm = torch.empty_like(nw)
        perm[grouped] = nw[shuffled]
        # An example whose shuffled label is its clean one has no other-class probability to give.
        keep = perm != cw
        nulls.append(float(logp[rows[keep], perm[keep]].mean()))
    null = torch.tensor(nulls, dtype=torch.float64)
    return MappingCheck(statistic, float(null.mean()), float(null.std()))


def align(dataset: Dataset, labels: dict[str, Tensor], spec: HumanLabelFile) -> Tensor:
    """``order``: the dataset's training index of each canonical image (``train_y[order] == clean``).

    The canonical pickled order is used as is. A copy grouped by class (an ImageFolder tree) is
    mapped by rank within class, after `check_mapping` confirms it. Raises ValueError when the
    copy's labels fit neither, or the images do not back the mapping."""
    clean = labels["clean"]
    train_y = dataset.train_y
    if len(train_y) != TRAIN_SIZE:
        raise ValueError(
            f"{spec.title} labels cover the {TRAIN_SIZE} CIFAR training images; this copy has {len(train_y)}"
        )
    if torch.equal(train_y, clean):
        return torch.arange(TRAIN_SIZE)
    if not torch.equal(train_y, train_y.sort().values) or not torch.equal(
        train_y.bincount(minlength=spec.num_classes), clean.bincount(minlength=spec.num_classes)
    ):
        raise ValueError(
            f"the training labels of {dataset.name} are neither in the canonical CIFAR order of "
            f"{spec.file} nor grouped by class as an ImageFolder copy with its class sizes: not the same images"
        )
    order = torch.argsort(clean, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(TRAIN_SIZE)
    reference = next(iter(spec.sets))
    check = recorded_check(dataset, spec)
    if check is None:
        check = check_mapping(dataset.train_x[position], clean, labels[reference])
        if check.z >= MAPPING_MIN_Z:
            record_check(dataset, spec, check)
    if check.z < MAPPING_MIN_Z:
        raise ValueError(
            f"the images of {dataset.name} do not match {spec.file}'s order: with file number r of each "
            f"class folder as the class's r-th canonical image, the human {reference} labels' confusions "
            f"fit the images {check.z:.1f} standard deviations above shuffled labels (at least "
            f"{MAPPING_MIN_Z:g} expected); use the canonical pickled copy (cifar-10-batches-py/)"
        )
    return position


# -- the mapping check's record, beside the tensor cache ------------------------------------------------

#: What a record of a passed mapping check is: a change to the check or its threshold is a new one.
MAPPING_RECORD_FORMAT = "samtune-mapping-check-v1"


def mapping_record_path(dataset: Dataset, spec: HumanLabelFile) -> Path | None:
    """Where the mapping check of ``dataset`` against ``spec``'s file is recorded: beside the
    tensor cache file the images were read from (None when they were not read through one)."""
    source = dataset.cached_as
    if source is None:
        return None
    stem = source.file.name.removesuffix(".samtune.pt")
    return source.file.with_name(f"{stem}.{Path(spec.file).stem}-mapping.json")


def _record_key(source: CachedSource, spec: HumanLabelFile) -> dict[str, Any]:
    """What a record must match to stand for a check of these images against this file."""
    return {
        "format": MAPPING_RECORD_FORMAT,
        "fingerprint": source.fingerprint,
        "sha256": source.sha256,
        "label_file_md5": spec.md5,
        "min_z": MAPPING_MIN_Z,
    }


def recorded_check(dataset: Dataset, spec: HumanLabelFile) -> MappingCheck | None:
    """The passed check recorded for these images (same source fingerprint, same tensors, same
    label file, same check and threshold), or None: no record, or one of another copy."""
    path = mapping_record_path(dataset, spec)
    if path is None or dataset.cached_as is None or not path.is_file():
        return None
    key = _record_key(dataset.cached_as, spec)
    try:
        record = json.loads(path.read_text())
        if {k: record.get(k) for k in key} != key:
            return None
        check = MappingCheck(float(record["statistic"]), float(record["null_mean"]), float(record["null_std"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or damaged: checked again, and the record rewritten
    return check if check.z >= MAPPING_MIN_Z else None


def record_check(dataset: Dataset, spec: HumanLabelFile, check: MappingCheck) -> None:
    """Record a passed check beside the tensor cache, so later processes skip it. Only passes are
    recorded: a copy that fails is refused before any trial, so its check runs once per attempt,
    and a record can then never refuse a copy the current check would accept."""
    path = mapping_record_path(dataset, spec)
    if path is None or dataset.cached_as is None:
        return
    record = {**_record_key(dataset.cached_as, spec), **dataclasses.asdict(check), "z": check.z}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Owner-only, like the cache beside it.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)  # atomic: parallel trial processes write the same record
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache folder: the check runs in every process


def noisy_train_labels(
    dataset: Dataset, base: str, kind: str, data_root: str | os.PathLike | None, seed: int
) -> Tensor:
    """The training labels of ``kind`` for ``dataset``, in its own order.

    Raises DataNotFoundError (no file), DataUnreadableError (not the published file) or ValueError
    (a class selection, a kind of another dataset, images that do not match the file)."""
    file_base, spec, name = label_file_for(kind)
    if base != file_base or dataset.name != base:
        raise ValueError(
            f"label_noise_kind={kind!r} holds {spec.title} labels, for dataset {file_base!r} with all its "
            f"classes; this trial's dataset is {dataset.name!r}"
        )
    labels = read_label_file(find_label_file(spec, data_root), spec)
    entry = _ALIGNED.get(id(dataset.train_x))
    if entry is None or entry[0]() is not dataset.train_x:
        entry = _ALIGNED[id(dataset.train_x)] = (weakref.ref(dataset.train_x), {})
    known = entry[1]
    if spec.file not in known:
        known[spec.file] = align(dataset, labels, spec)
    position = known[spec.file]
    noisy = labels[name] if kind.startswith("human:") else twin(labels, name, spec, seed)
    out = torch.empty_like(noisy)
    out[position] = noisy
    return out


def twin(labels: dict[str, Tensor], name: str, spec: HumanLabelFile, seed: int) -> Tensor:
    """The synthetic twin of label set ``name``, in the file's (canonical) order."""
    matrix = transition_matrix(labels["clean"], labels[name], spec.num_classes)
    return twin_labels(labels["clean"], matrix, seed)

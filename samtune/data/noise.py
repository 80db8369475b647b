"""Label noise: which training labels a trial flips, and to what.

Kinds, as in the label-noise experiments of the SAM paper (Foret et al., 2020) and of Han et al.
(2018, co-teaching):

- ``symmetric``: a flipped label becomes a uniformly random *other* class;
- ``pairflip``: a flipped label ``c`` becomes ``(c + 1) mod num_classes``;
- ``asymmetric``: class-dependent noise between visually similar classes, CIFAR-10's map of
  Patrini et al. (2017, "Making deep neural networks robust to label noise: a loss correction
  approach"): truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog; every other class
  stays clean. Known for ``cifar10`` (with a class selection, the pairs whose two classes are both
  kept); any other dataset is an error.

``symmetric``/``pairflip``: exactly ``round(rate * n)`` of the ``n`` labels flip.
``asymmetric``: each source class ``c`` of the map, holding ``n_c`` examples, has exactly
``round(rate * n_c)`` of them flipped to its target, so the noise transition matrix has ``rate``
off its diagonal in every source row (Patrini et al.'s T) up to rounding; the other classes keep
all their labels. Which labels flip, and to what, is fixed by the seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from samtune.contract.keys import SYNTHETIC_NOISE_KINDS
from samtune.data.load import parse_dataset_name

#: Asymmetric (class-dependent) noise maps by base dataset name, as class name -> class name:
#: CIFAR-10's of Patrini et al. (2017), also used by the co-teaching and DivideMix studies.
ASYMMETRIC_NOISE_MAPS: dict[str, dict[str, str]] = {
    "cifar10": {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"},
}


def apply_label_noise(
    labels: Tensor,
    rate: float,
    num_classes: int,
    kind: str = "symmetric",
    seed: int = 0,
    class_map: dict[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Flip labels at ``rate``; return ``(noisy_labels, flipped_indices)``.

    ``symmetric``: exactly ``round(rate * len(labels))`` labels flip, each to a uniformly random
    class other than its own. ``pairflip``: as many flip, label ``c`` to ``(c + 1) % num_classes``.
    ``asymmetric``: ``class_map`` ({source class: target class}, e.g. from
    `asymmetric_class_map`) says where each source class goes; of the ``n_c`` examples of each
    source class exactly ``round(rate * n_c)`` flip to its target, and labels of classes not in the
    map never change. Every index in ``flipped_indices`` (int64, ascending) holds a label different
    from the input, and every other label is unchanged. Same inputs and seed, same output.
    ``labels`` is not modified.
    Raises ValueError for a rate outside [0, 1], an unknown kind, fewer than 2 classes, labels
    outside ``0..num_classes-1``, or (asymmetric) a missing or malformed ``class_map``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    if kind not in SYNTHETIC_NOISE_KINDS:
        raise ValueError(
            f"unknown synthetic label noise kind {kind!r}; expected one of {SYNTHETIC_NOISE_KINDS} "
            "(human:/twin: kinds come from samtune.data.human_noise)"
        )
    labels = labels.to(torch.int64)
    n = labels.numel()
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got range {int(labels.min())}..{int(labels.max())}")
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "asymmetric":
        return _asymmetric_noise(labels, rate, num_classes, class_map, gen)
    count = round(rate * n)
    if count and num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    flipped = torch.randperm(n, generator=gen)[:count].sort().values
    noisy = labels.clone()
    if kind == "symmetric":
        # An offset in 1..C-1 is uniform over the other classes and never lands on the true one.
        offset = torch.randint(1, num_classes, (count,), generator=gen) if count else flipped
        noisy[flipped] = (labels[flipped] + offset) % num_classes
    else:
        noisy[flipped] = (labels[flipped] + 1) % num_classes
    return noisy, flipped


def _asymmetric_noise(
    labels: Tensor, rate: float, num_classes: int, class_map: dict[int, int] | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    if not class_map:
        raise ValueError(
            "label_noise_kind='asymmetric' needs a class_map {source class: target class}; "
            "samtune.data.noise.asymmetric_class_map gives the known ones"
        )
    for src, dst in class_map.items():
        if not (0 <= int(src) < num_classes and 0 <= int(dst) < num_classes) or int(src) == int(dst):
            raise ValueError(
                f"asymmetric class_map entry {src} -> {dst} must join two different classes in 0..{num_classes - 1}"
            )
    noisy = labels.clone()
    chosen = []
    # One class after another in ascending order, so the draws (and the result) depend only on
    # the labels and the seed, not on the map's insertion order.
    for src in sorted(int(c) for c in class_map):
        members = (labels == src).nonzero().flatten()
        count = round(rate * len(members))
        pick = members[torch.randperm(len(members), generator=gen)[:count]]
        noisy[pick] = int(class_map[src])
        chosen.append(pick)
    flipped = torch.cat(chosen).sort().values if chosen else torch.empty(0, dtype=torch.int64)
    return noisy, flipped


def asymmetric_class_map(dataset: str, classes: list[str]) -> dict[int, int]:
    """The asymmetric noise map of dataset ``dataset`` (a name as `load_dataset` takes it, class
    selection included) as label indices, for a dataset whose label ``i`` is named ``classes[i]``.

    With a class selection only the pairs whose source and target are both kept remain.
    Raises ValueError for a dataset without a known map (only ``cifar10`` has one) or a selection
    that keeps no pair.
    """
    base, _ = parse_dataset_name(dataset)
    names = ASYMMETRIC_NOISE_MAPS.get(base.lower())
    if names is None:
        raise ValueError(
            f"label_noise_kind='asymmetric' has a class map for {sorted(ASYMMETRIC_NOISE_MAPS)} "
            f"only (Patrini et al. 2017), not for dataset {dataset!r}; use 'symmetric' or "
            "'pairflip' there"
        )
    index = {name: i for i, name in enumerate(classes)}
    mapping = {index[a]: index[b] for a, b in names.items() if a in index and b in index}
    if not mapping:
        raise ValueError(
            f"dataset {dataset!r} keeps no pair of the asymmetric noise map {names} "
            f"(its classes: {classes}); select classes that include one, or use 'symmetric'"
        )
    return mapping

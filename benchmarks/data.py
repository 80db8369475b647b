"""Data path costs on the shared CIFAR-10 copy: first decode, cached load, share of an epoch.

Figures, all measured in this run:
- `first_decode_s`: `load_dataset("cifar10", <tarball>)` with an empty cache (read the tarball,
  decode 60,000 JPEGs, write the tensor cache); baseline `pil_decode_s`: the same JPEGs read with
  `tarfile` and decoded one by one with PIL, the usual way.
- `cache_load_s`: the same call again (reads and verifies the cache file).
- `data_share`: in one training epoch of the `cnn` model on a CIFAR-10 subset with SGD, the
  fraction of the epoch spent on data (shuffled indexing, batched random crop + flip, uint8 ->
  normalised float), the rest being forward, backward and the optimizer step.
- `augment_speedup`: data time per epoch of torchvision's per-image pipeline (a `DataLoader`
  over PIL images with `RandomCrop(32, padding=4)`, `RandomHorizontalFlip`, `ToTensor`,
  `Normalize`) divided by samtune's batched tensor path, over the same examples.

Ends with `ratios: data_share=X.XX cache_load_s=Y.Y` (targets: data_share < 0.05, cache_load_s < 3).

    python benchmarks/data.py [--tarball PATH] [--subset 5000] [--batch 128] [--threads 2] [--skip-pil]
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from samtune.data.load import load_dataset
from samtune.data.transforms import augment_batch, to_float
from samtune.models.zoo import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def pil_decode_all(tarball: Path) -> float:
    """Seconds to read every JPEG with tarfile and decode it with PIL into one uint8 array."""
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    images = []
    with tarfile.open(tarball, "r|gz") as tf:
        for member in tf:
            if member.isfile() and member.name.endswith(".jpg"):
                images.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGB")))
    np.stack(images)
    return time.perf_counter() - start


def samtune_epoch(x: torch.Tensor, y: torch.Tensor, mean, std, batch: int, seed: int) -> tuple[float, float]:
    """(data seconds, compute seconds) of one SGD epoch of the cnn with batched augmentation."""
    torch.manual_seed(seed)
    model = build_model("cnn", 10, (3, 32, 32)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    data_s = compute_s = 0.0
    t0 = time.perf_counter()
    order = torch.randperm(len(y), generator=gen)
    data_s += time.perf_counter() - t0
    for i in range(0, len(y) - batch + 1, batch):
        t0 = time.perf_counter()
        idx = order[i : i + batch]
        xb = to_float(augment_batch(x[idx], gen), mean, std)
        yb = y[idx]
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        data_s += t1 - t0
        compute_s += t2 - t1
    return data_s, compute_s


def torchvision_epoch_data(x: torch.Tensor, y: torch.Tensor, mean, std, batch: int, seed: int) -> float:
    """Seconds to produce one epoch of augmented, normalised batches with per-image transforms."""
    from PIL import Image
    from torchvision import transforms

    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]  # what ImageFolder/CIFAR10 hold
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(pil)

        def __getitem__(self, i: int):
            return transform(pil[i]), y[i]

    loader = torch.utils.data.DataLoader(
        Images(),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, default=SHARED)
    parser.add_argument("--subset", type=int, default=5000, help="training examples in the timed epoch")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-pil", action="store_true", help="skip the PIL decoding baseline")
    args = parser.parse_args()
    if not args.tarball.is_file():
        raise SystemExit(f"CIFAR-10 tarball not found at {args.tarball}; pass --tarball PATH")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        load_dataset("cifar10", args.tarball, cache_dir=cache, download=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        ds = load_dataset("cifar10", args.tarball, cache_dir=cache, download=False)
        cached = time.perf_counter() - start
    print(f"first_decode_s: {first:.2f}")
    if not args.skip_pil:
        pil = pil_decode_all(args.tarball)
        print(f"pil_decode_s: {pil:.2f}")
        print(f"first_decode/pil_decode: {first / pil:.2f}")
    print(f"cache_load_s: {cached:.2f}")

    idx = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(0))[: args.subset]
    x, y = ds.train_x[idx].contiguous(), ds.train_y[idx].contiguous()
    samtune_epoch(x[: 4 * args.batch], y[: 4 * args.batch], ds.mean, ds.std, args.batch, 0)  # warm-up
    data_s, compute_s = samtune_epoch(x, y, ds.mean, ds.std, args.batch, 1)
    share = data_s / (data_s + compute_s)
    print(f"epoch_data_s: {data_s:.3f}")
    print(f"epoch_compute_s: {compute_s:.3f}")
    tv_data = torchvision_epoch_data(x, y, ds.mean, ds.std, args.batch, 1)
    print(f"torchvision_epoch_data_s: {tv_data:.3f}")
    print(f"augment_speedup: {tv_data / data_s:.1f}")
    print(f"ratios: data_share={share:.2f} cache_load_s={cached:.1f}")


if __name__ == "__main__":
    main()

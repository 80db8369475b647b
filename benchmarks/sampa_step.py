"""SAMPa's wall clock per step on two worker processes, against SGD and SAM on one.

SAMPa (`samtune.optim.sampa`) makes SAM's two gradients independent: on two workers each computes
one, and one all-reduce per step hands both to both. Per step, a worker then does one
forward/backward pass, as SGD does, plus the exchange (a flat buffer of twice the parameters)
and the bookkeeping of the two points. This measures what that costs on one machine: the same
model, batch and thread count per process (``--threads``, default 1), SGD and SAM in one process,
SAMPa in two (gloo, the batch shared by the pair: both see the same examples), random inputs of
CIFAR-10's shape (``--shape``). SAMPa uses twice SGD's hardware; the ratio says whether it buys SAM's second
gradient for the time of SGD's one.

Also timed: the exchange alone (an all-reduce of the same flat buffer), so the output says how
much of SAMPa's step is communication.

Ends with ``ratios: sam/sgd=X.XX sampa/sgd=Y.YY allreduce/sgd=Z.ZZ`` (per-step seconds, median of
``--steps`` steps after ``--warmup``). Target: sampa/sgd <= 1.1.

    python benchmarks/sampa_step.py [--model resnet20] [--batch 128] [--steps 20] [--threads 1]
                                    [--shape 3,32,32]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from samtune.models.zoo import build_model
from samtune.optim.sam import SAM
from samtune.optim.step import sam_step
from samtune.optim.variants import variant_from_config

CLASSES = 10


def _setup(args, method: str):
    torch.manual_seed(0)
    model = build_model(args.model, CLASSES, args.shape)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if method == "sgd":
        return model, torch.optim.SGD(model.parameters(), **kwargs), None
    optimizer = SAM(model.parameters(), rho=0.05, **kwargs)
    variant = variant_from_config({"sam_variant": "full" if method == "sam" else method, "seed": 0})
    return model, optimizer, variant


def _step_times(args, model, optimizer, variant) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *args.shape, generator=gen)
    y = torch.randint(0, CLASSES, (args.batch,), generator=gen)
    times = []
    for i in range(args.warmup + args.steps):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        if variant is None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        else:
            sam_step(model, F.cross_entropy, x, y, optimizer, variant=variant)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def _one_process(args, method: str) -> float:
    torch.set_num_threads(args.threads)
    return statistics.median(_step_times(args, *_setup(args, method)))


def _paired(rank: int, args, init_file: str, out) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(minutes=10)
    )
    try:
        model, optimizer, variant = _setup(args, "sampa")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        step = statistics.median(_step_times(args, ddp, optimizer, variant))
        # The exchange alone: one all-reduce of a flat buffer of both gradients.
        flat = torch.zeros(2 * sum(p.numel() for p in model.parameters()))
        exchanges = []
        for _ in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(flat)
            exchanges.append(time.perf_counter() - start)
        if rank == 0:
            out.put((step, statistics.median(exchanges)))
    finally:
        dist.destroy_process_group()


def _two_processes(args) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="sampa-step-") as folder:
        procs = [ctx.Process(target=_paired, args=(rank, args, f"{folder}/init", out)) for rank in range(2)]
        for proc in procs:
            proc.start()
        result = out.get()
        for proc in procs:
            proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", default="3,32,32", help="input shape (1,8,8: the embedded digits)")
    args = parser.parse_args()
    args.shape = tuple(int(n) for n in args.shape.split(","))
    sgd, sam = _one_process(args, "sgd"), _one_process(args, "sam")
    sampa, exchange = _two_processes(args)
    print(
        f"{args.model} on {args.shape} inputs, batch {args.batch}, {args.threads} thread(s) per process, median of {args.steps} steps"
    )
    print(f"  sgd   (1 process)   {sgd * 1e3:8.1f} ms/step")
    print(f"  sam   (1 process)   {sam * 1e3:8.1f} ms/step")
    print(
        f"  sampa (2 processes) {sampa * 1e3:8.1f} ms/step  (twice SGD's hardware; the exchange alone "
        f"{exchange * 1e3:.1f} ms)"
    )
    print(f"ratios: sam/sgd={sam / sgd:.2f} sampa/sgd={sampa / sgd:.2f} allreduce/sgd={exchange / sgd:.2f}")


if __name__ == "__main__":
    main()

"""Data-parallel SAM: throughput of 1 vs 2 CPU workers, and gradient all-reduce rounds per step.

Baselines, measured in this run on the same model, data and global batch:
- throughput: `samtune.fit` in this process (one worker, one thread) against
  `TorchTrainer(train_loop_per_worker)` with 2 gloo workers of one thread each; samples/s of the
  last epoch (the first carries start-up costs). No target: on a 2-core machine shared with other
  work the two workers compete with everything else.
- communication: inside the same 2-worker group, SAM steps taken the way the training loop takes
  them, counting all-reduce rounds per step: DDP's (a communication hook counts the last bucket
  of every reduction) plus the hand-made ones (`torch.distributed.all_reduce` wrapped). Per-worker
  m (first pass inside `no_sync()`) should need one round, m = global batch (classic SAM) two,
  and m-sharpness groups inside a worker one.

Prints one `name: value` line per figure and ends with
`ratios: allreduce_per_step_perworker=1 allreduce_per_step_synced=2 throughput_2w/1w=X.XX`.

    python benchmarks/workers.py [--model cnn] [--batch 128] [--epochs 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.nn.functional as F


def count_rounds(config: dict, steps: int) -> dict[str, float]:
    """In a Ray Train worker: all-reduce rounds per SAM step for each way of forming eps."""
    import ray.train.torch
    import torch.distributed as dist

    from samtune.data.scenarios import build_scenario
    from samtune.data.transforms import to_float
    from samtune.optim.step import sam_step
    from samtune.trial.build import build_optimizer
    from samtune.trial.config import perturbation_plan, resolve_config

    rank, world = dist.get_rank(), dist.get_world_size()
    counts = {"ddp": 0, "manual": 0}
    plain_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        counts["manual"] += 1
        return plain_all_reduce(*args, **kwargs)

    def counting_hook(state, bucket):
        counts["ddp"] += int(bucket.is_last())  # one reduction = its buckets, the last closes it
        # DDP's default hook, but on the unwrapped all_reduce: through `dist.all_reduce` every
        # DDP bucket would be counted a second time as a hand-made round.
        tensor = bucket.buffer().div_(world)
        return plain_all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    rounds = {}
    for name, m in (
        ("perworker", None),
        ("synced", config["batch_size"]),
        ("groups", config["batch_size"] // world // 4),
    ):
        cfg = resolve_config({**config, "workers": world, "m": m})
        plan = perturbation_plan(cfg)
        sc = build_scenario(cfg)
        torch.manual_seed(cfg["seed"])
        module = sc.build_model(cfg["model"], cfg["norm"])
        model = ray.train.torch.prepare_model(module, move_to_device=False)
        model.register_comm_hook(None, counting_hook)
        optimizer = build_optimizer(cfg, module, total_steps=steps)
        local = plan.per_worker_batch
        counts.update(ddp=0, manual=0)
        dist.all_reduce = counting_all_reduce
        try:
            for s in range(steps):
                idx = torch.arange((s * world + rank) * local, (s * world + rank + 1) * local)
                x, y = to_float(sc.train_x[idx], sc.mean, sc.std), sc.train_y[idx]
                sam_step(
                    model,
                    F.cross_entropy,
                    x,
                    y,
                    optimizer,
                    m=plan.m if plan.groups_per_worker > 1 else None,
                    sync_perturbation=plan.sync_all,
                )
        finally:
            dist.all_reduce = plain_all_reduce
        rounds[name] = (counts["ddp"] + counts["manual"]) / steps
    return rounds


def bench_worker(config: dict) -> None:
    """Ray Train worker: count rounds, then train normally (reporting samples/s per epoch)."""
    import torch.distributed as dist

    from samtune.trial.entry import train_loop_per_worker

    rounds = count_rounds(config["train"], config["steps"])
    if dist.get_rank() == 0:
        with open(config["rounds_file"], "w") as fh:
            json.dump(rounds, fh)
    train_loop_per_worker(config["train"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="SAM steps per communication count")
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from samtune.trial.entry import fit

    config = {
        "dataset": "digits",
        "model": args.model,
        "epochs": args.epochs,
        "batch_size": args.batch,
        "optimizer": "sam",
        "rho": 0.05,
        "lr": 0.05,
        "sharpness_measures": (),
        "seed": 0,
    }
    torch.set_num_threads(1)
    one = fit(config)
    print(f"samples_per_s_1w: {one['samples_per_s']:.1f}")

    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rounds_file = os.path.join(tmp, "rounds.json")
            result = TorchTrainer(
                bench_worker,
                train_loop_config={"train": {**config, "workers": 2}, "steps": args.steps, "rounds_file": rounds_file},
                scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name="workers-bench", storage_path=tmp),
            ).fit()
            with open(rounds_file) as fh:
                rounds = json.load(fh)
            two = result.metrics["samples_per_s"]
    finally:
        ray.shutdown()
    print(f"samples_per_s_2w: {two:.1f}")
    for name, value in rounds.items():
        print(f"allreduce_per_step_{name}: {value:g}")
    print(f"test_error_1w: {one['test_error']:.4f}  test_error_2w: {result.metrics['test_error']:.4f}")
    print(
        f"ratios: allreduce_per_step_perworker={rounds['perworker']:g} "
        f"allreduce_per_step_synced={rounds['synced']:g} throughput_2w/1w={two / one['samples_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()

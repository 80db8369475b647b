"""What a sweep costs beyond the training it runs: sweep wall time against the trials' own compute.

By default the sweep is the embedded study's (`search_spaces/noisy_digits.py`: 5 label-noise
cells x 6 trials x 16 epochs, SGD/SAM on digits), run through `samtune.sweep.run_sweep` on a local
Ray instance, with MLflow records in a fresh SQLite store; ASHA's grace period is the whole budget
and sharpness is not measured, so every trial trains the same epochs and only the sweep's own
costs differ from compute. Baseline, measured in the same run: the trials' own compute,
`compute_time_s` as each trial measures it inside itself (its epochs: training steps and
evaluation; no process start, data loading, reporting or checkpointing), summed over trials and
divided by the number of trials that run at once, i.e. the wall time a perfectly packed sweep
with no overhead would take. The ratio is everything else: Ray start, trial processes starting
and importing torch, trial scheduling and actor reuse, data loading per trial, checkpoints,
Tune and MLflow bookkeeping in the driver, a slot idling while the last trial runs. `ray_start_s`
(the local Ray instance coming up, paid once per sweep) is printed apart, with the ratio it
leaves. `--noise-rates 0.4 --trials 8` measures one cell, where those fixed costs weigh most.

Prints one `name: value` line per figure and ends with `ratios: sweep_wall/trial_compute=X.XX`
(target: under 1.25 on a 2-core machine at the default concurrency).

`--storage s3` keeps the sweep in object storage (``--storage-path s3://bench/sweeps``) on an S3
API server this script starts on 127.0.0.1 (moto's server mode, from the test extra) and stops;
`--storage both` measures the local folder first, then S3, in one run, and adds the ratio of the
two walls and the bytes each trial writes to the bucket per epoch (its checkpoints, counted from
their indices since only the two newest are kept, and its result files).

    python benchmarks/sweep_overhead.py [--trials 6] [--epochs 16] [--model cnn] [--noise-rates 0.0,0.2,0.4,0.6,0.8]
        [--storage local|s3|both]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per cell")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--model", default="cnn")
    parser.add_argument(
        "--noise-rates",
        default="0.0,0.2,0.4,0.6,0.8",
        help="the cells (default: the embedded study's); 0.4 alone measures one cell",
    )
    parser.add_argument("--storage", choices=["local", "s3", "both"], default="local")
    args = parser.parse_args()
    walls = {}
    for storage in ["local", "s3"] if args.storage == "both" else [args.storage]:
        print(f"--- storage: {storage}")
        if storage == "s3":
            with s3_server() as client:
                walls[storage] = measure(args, "s3://bench/sweeps")
                print_bytes_per_epoch(client, args.epochs)
        else:
            walls[storage] = measure(args, None)
    if len(walls) == 2:
        print(f"ratios: s3_wall/local_wall={walls['s3'] / walls['local']:.2f}")


def measure(args: argparse.Namespace, storage: str | None) -> float:
    """Run the sweep (in a local folder, or at ``storage``), print its figures; its wall."""
    from samtune.sweep.driver import prepare, run_sweep

    with tempfile.TemporaryDirectory(prefix="samtune-bench-") as tmp:
        os.chdir(tmp)
        os.environ["SAMTUNE_STAGING"] = f"{tmp}/staging"
        plan = prepare(
            str(ROOT / "search_spaces" / "noisy_digits.py"),
            [
                "name=bench",
                f"model={args.model}",
                f"epochs={args.epochs}",
                f"trials={args.trials}",
                f"label_noise_rates={args.noise_rates}",
                # ASHA would end trials early and measure scheduling, not overhead.
                f"grace_period={args.epochs}",
                "fixed.sharpness_measures=",
                "confirm_seeds=0",
            ],
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            storage_path=storage or f"{tmp}/runs",
        )
        import ray

        import samtune.sweep.driver
        from samtune.sweep.driver import trial_resources

        # Ray starts inside run_sweep (the MLflow store opens meanwhile); timed on its own too.
        ray_times = []
        start_ray = samtune.sweep.driver.start_ray

        def timed_start(address):
            t0 = time.perf_counter()
            start_ray(address)
            ray_times.append(time.perf_counter() - t0)

        samtune.sweep.driver.start_ray = timed_start
        start = time.perf_counter()
        cells = run_sweep(plan)
        wall = time.perf_counter() - start
        samtune.sweep.driver.start_ray = start_ray
        _, _, concurrent = trial_resources(plan.sweep, ray.cluster_resources())
        ray.shutdown()
        os.chdir(ROOT)
    report(args, cells, concurrent, wall, sum(ray_times))
    return wall


def report(args: argparse.Namespace, cells: list, concurrent: int, wall: float, ray_start: float) -> None:
    compute = [
        row.metrics["compute_time_s"]
        for cell in cells
        for row in cell.trials.values()
        if "compute_time_s" in row.metrics
    ]
    if len(compute) != args.trials * len(cells):
        sys.exit(f"only {len(compute)} of {args.trials * len(cells)} trials reported compute_time_s")
    # Cells run one after the other, each with up to `concurrent` trials at once.
    ideal = sum(compute) / concurrent
    print(f"trials: {len(cells)} cell(s) x {args.trials} x {args.epochs} epochs of {args.model}, {concurrent} at once")
    print(f"trial_compute_sum_s: {sum(compute):.1f}")
    print(f"trial_compute_packed_s: {ideal:.1f}")
    print(f"sweep_wall_s: {wall:.1f}")
    print(f"ray_start_s: {ray_start:.1f}")
    print(f"sweep_wall_after_ray_start/trial_compute: {(wall - ray_start) / ideal:.2f}")
    print(f"ratios: sweep_wall/trial_compute={wall / ideal:.2f}")


@contextlib.contextmanager
def s3_server() -> Iterator[Any]:
    """moto's S3 server on a free port of 127.0.0.1 with a bucket ``bench``; this process's
    environment points at it while it runs, and it is stopped by PID."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )  # fmt: skip
        deadline = time.time() + 30
        while True:
            try:
                client = boto3.client("s3")
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001  not listening yet
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def print_bytes_per_epoch(client: Any, epochs: int) -> None:
    """Bytes each trial wrote to the bucket per epoch: a checkpoint each epoch (the newest's size
    times how many there were, read from their indices) and its result files."""
    sizes: dict[str, dict[str, int]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="sweeps/bench/trials/"):
        for obj in page.get("Contents", []):
            parts = obj["Key"].split("/")
            if len(parts) > 4:
                sizes.setdefault(parts[3], {})["/".join(parts[4:])] = obj["Size"]
    per_epoch = []
    for files in sizes.values():
        index = {int(k.split("/")[0].split("_")[1]) for k in files if k.startswith("checkpoint_")}
        if not index:
            continue
        newest = f"checkpoint_{max(index):06d}/"
        checkpoint = sum(v for k, v in files.items() if k.startswith(newest))
        results = sum(v for k, v in files.items() if not k.startswith("checkpoint_"))
        per_epoch.append(((max(index) + 1) * checkpoint + results) / epochs)
    if per_epoch:
        per_epoch.sort()
        print(f"bucket_bytes_per_trial_epoch: median {per_epoch[len(per_epoch) // 2] / 1024:.1f} KiB")


if __name__ == "__main__":
    main()

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

    python benchmarks/sweep_overhead.py [--trials 6] [--epochs 16] [--model cnn] [--noise-rates 0.0,0.2,0.4,0.6,0.8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

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
    args = parser.parse_args()

    from samtune.sweep.driver import prepare, run_sweep

    with tempfile.TemporaryDirectory(prefix="samtune-bench-") as tmp:
        os.chdir(tmp)
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
            ],
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            storage_path=f"{tmp}/runs",
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
        ray_start = sum(ray_times)

        _, _, concurrent = trial_resources(plan.sweep, ray.cluster_resources())
        ray.shutdown()

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


if __name__ == "__main__":
    main()

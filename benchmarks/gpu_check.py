"""GPU check: SAM's cost, mixed precision, torch.compile, data-parallel workers and a shrunk sweep.

samtune's GPU paths in one run, every figure against a baseline measured in the same run.

Figures (on CUDA, sized to finish in under 8 minutes on one H200; flags scale each part):

1. `sam/sgd_epoch`: seconds of one training epoch of SAM over SGD, ResNet-18 on the whole CIFAR-10
   training split (45,000 images after the validation split), batch 128, `--precision` (bf16)
   autocast, through `samtune.fit` (so with the GPU trial's defaults, channels_last on).
   Each optimizer trains 2 epochs and the second epoch's `epoch_time_s` is compared: the training
   steps of that epoch (data order, augmentation, both SAM passes, optimizer and LR schedule),
   not the evaluation after it; the first epoch (CUDA kernels loaded and chosen, the allocator
   growing) is the warm-up. Target: <= 2.05.
2. `bf16_loss_rel_diff`, `fp16_loss_rel_diff`: `--precision-steps` (300) SAM steps of the same
   model from the same initialisation on the same batches in fp32, in bf16 autocast and in fp16
   autocast with a `GradScaler`, each step through `samtune.sam.sam_step` as the training loop
   calls it. Per precision: the final loss (mean training loss of the last tenth of the steps),
   whether every step's loss was finite, and |loss - fp32 loss| / fp32 loss (`close` when under
   `--loss-rtol`, 0.1).
3. `compile/eager`, `channels_last/eager`: seconds per SAM step (bf16 autocast; the best of 3
   rounds' medians, after warm-up steps that include compilation) of `torch.compile(model)`
   (NCHW) and of the model in channels_last, over the same model eager in NCHW; the three take
   turns round by round.
4. Data parallelism through Ray Train (`TorchTrainer(samtune.train_loop_per_worker)`): NCCL
   with one worker per GPU where there are several GPUs, and gloo with 2 workers sharing one GPU
   (NCCL refuses two ranks on one device); samples/s of the last epoch and that it completed.
5. `search_spaces/noisy_cifar10.py` shrunk to 40% label noise, `--epochs` (30) epochs and
   `--trials` (2) trials per optimizer (the cell's first two trials are its SGD and SAM baselines,
   the rest are TPE's picks, so the split of those is TPE's), on `--sweep-subset` (10,000)
   training images in `--precision`, through the real sweep (`samtune.sweep.prepare` / `run_sweep`, Ray
   Tune + Optuna + ASHA) with a temporary storage path and a SQLite MLflow store in a temporary
   folder; the best SGD and SAM trial (by validation error, as the sweep's summary picks them)
   and their clean test error.

Without a GPU (or with `--dry-run`) it says so and runs the same code paths tiny on CPU, in
about a minute on 2 cores: the `cnn` on 1,024 CIFAR-10 images (512 for the workers and the
sweep; the embedded digits when CIFAR-10 is not in `--data-root`), fp32 and bf16 (fp16 is skipped: its
loss scaling is for CUDA), torch.compile with the `eager` backend (inductor's C++ build alone
takes tens of seconds on 2 cores), gloo with 2 CPU workers, and the sweep at 1 epoch x 1 trial
per optimizer. Its timings only show the code runs; they say nothing about a GPU.

Prints one `name: value` line per figure and ends with
`ratios: sam/sgd_epoch=X.XX bf16_loss_rel_diff=... fp16_loss_rel_diff=... all_finite=yes
compile/eager=... channels_last/eager=... nccl_samples_per_s=... gloo_2w_samples_per_s=...
sweep_sgd_test_error=... sweep_sam_test_error=...` on one line (`n/a` for what did not run).
Exit status 1 when a part failed (its error is printed), else 0.

    python benchmarks/gpu_check.py [--data-root ../shared/data] [--epochs 30] [--trials 2]
        [--sweep-subset 10000] [--precision-steps 300] [--dry-run] [--skip sweep ...]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from samtune.sweep.ray_env import apply_ray_env

ROOT = Path(__file__).resolve().parents[1]
# The shared data sit next to the project: <project>/../shared/data.
DATA_ROOT = ROOT.parent / "shared" / "data"
SPACE_FILE = ROOT / "search_spaces" / "noisy_cifar10.py"
PARTS = ("epoch", "precision", "compile", "workers", "sweep")

# Per-mode defaults of the flags left unset. GPU: sized for < 8 minutes on one H200. Dry run:
# the same code paths in about a minute or two on 2 CPU cores.
GPU = {
    "model": "resnet18",
    "subset": None,
    "test_subset": None,
    "precision": "bf16",
    "precision_steps": 300,
    "timed_steps": 10,
    "warmup_steps": 5,
    "compile_backend": "inductor",
    "workers_subset": 20000,
    "workers_epochs": 2,
    "epochs": 30,
    "trials": 2,
    "sweep_subset": 10000,
    "sweep_model": None,
}
DRY = {
    "model": "cnn",
    "subset": 1024,
    "test_subset": 256,
    "precision": "fp32",
    "precision_steps": 20,
    "timed_steps": 2,
    "warmup_steps": 3,
    "compile_backend": "eager",
    "workers_subset": 512,
    "workers_epochs": 1,
    "epochs": 1,
    "trials": 1,
    "sweep_subset": 512,
    "sweep_model": "cnn",
}

SAM_SETTINGS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "rho": 0.05}


class PartFailed(RuntimeError):
    """Part of a part failed; `figures` holds what the rest of it measured."""

    def __init__(self, message: str, figures: dict) -> None:
        super().__init__(message)
        self.figures = figures


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- 1. epoch time
def epoch_times(args, data: dict) -> dict:
    """Second-epoch training seconds of SGD and SAM through `fit`, same data, model and order."""
    from samtune.trial.entry import fit

    out = {}
    for optimizer in ("sgd", "sam"):
        epochs = []
        config = {
            **data,
            **SAM_SETTINGS,
            "model": args.model,
            "optimizer": optimizer,
            "epochs": 2,
            "batch_size": args.batch,
            "precision": args.precision,
            "use_gpu": args.gpus > 0,
            "data_subset": args.subset,
            "test_subset": args.test_subset,
            "sharpness_measures": (),
            "seed": 0,
        }
        last = fit(config, report=epochs.append)
        if last.get("diverged"):
            raise RuntimeError(f"{optimizer} diverged: {last}")
        out[optimizer] = epochs[-1]["epoch_time_s"]
        print(
            f"{optimizer}_epoch_s: {out[optimizer]:.3f}  "
            f"({epochs[-1]['samples_per_s']:.0f} samples/s, warm-up epoch {epochs[0]['epoch_time_s']:.3f} s)",
            flush=True,
        )
    ratio = out["sam"] / out["sgd"]
    print(f"sam/sgd_epoch: {ratio:.2f} (target <= 2.05)")
    return {"sam/sgd_epoch": ratio, "sam_samples_per_s": last["samples_per_s"]}


# ----------------------------------------------------------------------------- steps by hand
class Stepper:
    """SAM steps of one model on a scenario's training data, as the training loop takes them:
    uint8 batches normalised on the device, autocast around `sam_step`, a GradScaler for fp16."""

    def __init__(
        self,
        scenario,
        args,
        device,
        *,
        precision: str,
        channels_last: bool = False,
        compile_backend: str | None = None,
        seed: int = 0,
    ) -> None:
        import torch

        from samtune.optim.sam import SAM

        self.device, self.batch = device, args.batch
        torch.manual_seed(seed)
        model = scenario.build_model(args.model, "batch").to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = SAM(model.parameters(), **SAM_SETTINGS)
        self.model = torch.compile(model, backend=compile_backend) if compile_backend else model
        self.channels_last = channels_last
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.x, self.y = scenario.train_x.to(device), scenario.train_y.to(device)
        # On the device once: `to_float` given Python sequences copies them host-to-device on
        # every batch, and such a copy waits for the GPU to drain its queue.
        self.norm = tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in (scenario.mean, scenario.std))
        self.seed, self.taken = seed, 0
        self.order = None
        self.per_pass = len(self.y) // self.batch
        if self.per_pass < 1:
            raise ValueError(f"batch {self.batch} is larger than the {len(self.y)} training examples")

    def step(self):
        """One SAM step; returns the first pass's loss as a device tensor (no host sync)."""
        import torch
        import torch.nn.functional as F

        from samtune.data.transforms import to_float
        from samtune.optim.step import sam_step

        k = self.taken % self.per_pass
        if k == 0:  # a new pass over the data, in an order fixed by (seed, pass)
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.taken // self.per_pass)
            self.order = torch.randperm(len(self.y), generator=gen).to(self.device)
        idx = self.order[k * self.batch : (k + 1) * self.batch]
        xb = to_float(self.x[idx], *self.norm)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            loss, _ = sam_step(self.model, F.cross_entropy, xb, self.y[idx], self.optimizer, scaler=self.scaler)
        self.taken += 1
        return loss

    def timed(self, steps: int) -> float:
        """Median seconds per step over `steps` steps (each synchronised)."""
        times = []
        for _ in range(steps):
            sync(self.device)
            start = time.perf_counter()
            self.step()
            sync(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


# ----------------------------------------------------------------------------- 2. precision
def precision_losses(args, scenario, device) -> dict:
    import torch

    steps = args.precision_steps
    tail = max(1, steps // 10)
    precisions = ["fp32", "bf16", "fp16"]
    skipped = {}
    if device.type != "cuda":
        skipped["fp16"] = "fp16 autocast with a GradScaler needs CUDA; samtune refuses precision=fp16 on CPU"
    elif not torch.cuda.is_bf16_supported():
        skipped["bf16"] = f"{torch.cuda.get_device_name(device)} has no bf16 support"
    out: dict = {}
    finite_all = True
    for precision in precisions:
        if precision in skipped:
            print(f"{precision}: skipped ({skipped[precision]})")
            continue
        stepper = Stepper(scenario, args, device, precision=precision)
        losses = torch.stack([stepper.step().float() for _ in range(steps)])
        finite = bool(torch.isfinite(losses).all())
        params_finite = all(bool(torch.isfinite(p).all()) for p in stepper.optimizer.param_groups[0]["params"])
        final = float(losses[-tail:].mean())
        out[precision] = final
        finite_all &= finite and params_finite
        line = (
            f"{precision}_final_loss: {final:.4f}  (mean of the last {tail} of {steps} steps; "
            f"first step {float(losses[0]):.4f})"
        )
        if stepper.scaler is not None:
            line += f"  loss scale {stepper.scaler.get_scale():g}"
        print(line)
        print(f"{precision}_all_finite: {fmt(finite and params_finite)}", flush=True)
    result = {"all_finite": finite_all}
    for precision in ("bf16", "fp16"):
        if precision in out and "fp32" in out:
            diff = abs(out[precision] - out["fp32"]) / out["fp32"]
            result[f"{precision}_loss_rel_diff"] = diff
            result[f"{precision}_final_loss"] = out[precision]
            print(
                f"{precision}_loss_rel_diff: {diff:.4f} ({'close' if diff <= args.loss_rtol else 'NOT close'}: "
                f"tolerance {args.loss_rtol:g})"
            )
    result["fp32_final_loss"] = out.get("fp32")
    return result


# ----------------------------------------------------------------------------- 3. compile
def step_speed(args, scenario, device) -> dict:
    precision = "bf16" if device.type == "cuda" else "fp32"
    variants = {
        "eager": {},
        "channels_last": {"channels_last": True},
        "compile": {"compile_backend": args.compile_backend},
    }
    steppers, warm, errors = {}, {}, []
    for name, how in variants.items():
        try:
            stepper = Stepper(scenario, args, device, precision=precision, **how)
            sync(device)
            start = time.perf_counter()
            for _ in range(args.warmup_steps):
                stepper.step()
            sync(device)
        except Exception as exc:  # noqa: BLE001  a compiler failure leaves channels_last's figure standing
            if name != "compile":
                raise
            traceback.print_exc()
            errors.append(f"compile: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            continue
        steppers[name], warm[name] = stepper, time.perf_counter() - start
    # Round by round, so a change of load on the machine lands on all three alike.
    rounds = {name: [] for name in steppers}
    for _ in range(3):
        for name, stepper in steppers.items():
            rounds[name].append(stepper.timed(args.timed_steps))
    seconds = {name: min(values) for name, values in rounds.items()}
    print(f"step_precision: {precision}  compile_backend: {args.compile_backend}")
    for name, value in seconds.items():
        print(f"{name}_step_ms: {value * 1e3:.2f}  (warm-up {args.warmup_steps} steps {warm[name]:.1f} s)")
    result = {f"{name}/eager": value / seconds["eager"] for name, value in seconds.items() if name != "eager"}
    for name, value in result.items():
        print(f"{name}: {value:.2f}", flush=True)
    if errors:
        raise PartFailed("; ".join(errors), result)
    return result


# ----------------------------------------------------------------------------- 4. workers
def start_ray(args) -> None:
    import ray

    if ray.is_initialized():
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.gpus == 0:
        cpus = min(cpus, 2)
    # address="local": a new instance of our own even where `ray start` left a cluster running,
    # which ray.init() would join instead (and then refuse num_cpus).
    ray.init(
        address="local",
        num_cpus=cpus,
        num_gpus=args.gpus,
        include_dashboard=False,
        runtime_env=apply_ray_env(),
        log_to_driver=False,
        logging_level="ERROR",
    )


def data_parallel(args, data: dict, storage: str) -> dict:
    """samples/s of the last epoch of `train_loop_per_worker` under TorchTrainer: NCCL, one worker
    per GPU (several GPUs), and gloo, 2 workers sharing one GPU (or 2 CPU workers)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from samtune.trial.entry import train_loop_per_worker

    start_ray(args)
    runs = []
    if args.gpus >= 2:
        runs.append(("nccl", args.gpus, {"CPU": 1.0, "GPU": 1.0}))
    else:
        print(
            f"nccl: skipped ({args.gpus} GPU{'s' if args.gpus != 1 else ''}; NCCL needs one GPU per worker "
            f"and at least 2)"
        )
    share = {"CPU": 1.0, "GPU": 0.5} if args.gpus else {"CPU": 1.0}
    runs.append(("gloo_2w", 2, share))
    out, errors = {}, []
    for name, workers, resources in runs:
        backend = name.split("_")[0]
        config = {
            **data,
            **SAM_SETTINGS,
            "model": args.model,
            "optimizer": "sam",
            "epochs": args.workers_epochs,
            "batch_size": args.batch * (workers if backend == "nccl" else 1),
            "precision": args.precision,
            "use_gpu": args.gpus > 0,
            "workers": workers,
            "backend": backend,
            "data_subset": args.workers_subset,
            "test_subset": args.test_subset,
            "sharpness_measures": (),
            "seed": 0,
        }
        start = time.perf_counter()
        where = ("one GPU each" if backend == "nccl" else "sharing one GPU") if args.gpus else "on CPU"
        print(f"{name}: {workers} workers {where}, {backend}, global batch {config['batch_size']}", flush=True)
        try:
            result = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=config,
                torch_config=TorchConfig(backend=backend),
                scaling_config=ScalingConfig(
                    num_workers=workers, use_gpu=args.gpus > 0, resources_per_worker=resources
                ),
                run_config=RunConfig(name=f"gpu-check-{name}", storage_path=storage),
            ).fit()
            metrics = result.metrics or {}
            if result.error is not None or metrics.get("epoch") != args.workers_epochs or metrics.get("diverged"):
                raise RuntimeError(f"error={result.error!r}, last metrics={metrics}")
        except Exception as exc:  # noqa: BLE001  the other backend's run still tells something
            traceback.print_exc()
            errors.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            print(f"{name}_completed: no")
            continue
        print(f"{name}_completed: yes  ({time.perf_counter() - start:.1f} s with start-up)")
        out[f"{name}_samples_per_s"] = metrics["samples_per_s"]
        print(
            f"{name}_samples_per_s: {metrics['samples_per_s']:.1f}  (test_error {metrics['test_error']:.4f}, "
            f"all-reduce rounds per step {fmt(metrics.get('allreduce_per_step'))})",
            flush=True,
        )
    if errors:
        raise PartFailed("; ".join(errors), out)
    return out


# ----------------------------------------------------------------------------- 5. sweep
def sweep(args, data_root: Path | None, storage: Path) -> dict:
    """noisy_cifar10.py, shrunk, through the sweep machinery; the best SGD and SAM trial."""
    import logging

    from mlflow.tracking import MlflowClient

    from samtune.sweep.driver import prepare, run_sweep
    from samtune.sweep.results import summarize

    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    start_ray(args)
    import ray

    cluster = ray.cluster_resources()
    total = 2 * args.trials
    sets = [
        "name=gpu-check",
        "label_noise_rates=0.4",
        f"epochs={args.epochs}",
        f"trials={total}",
        f"data_subset={args.sweep_subset}",
        "sharpness_every=0",
        "fixed.sharpness_measures=m_sharpness",
    ]
    if args.gpus:
        # Every trial at once on the GPUs there are: a ResNet-32 at batch 128 leaves most of one idle.
        share = min(1.0, max(0.01, math.floor(args.gpus / total * 100) / 100))
        sets += [
            f"gpus_per_trial={share:g}",
            f"cpus_per_trial={max(1, int(cluster.get('CPU', 1) // total)):g}",
            f"fixed.precision={args.precision}",
        ]
    else:
        sets += [
            "gpus_per_trial=0",
            "cpus_per_trial=1",
            f"fixed.test_subset={args.test_subset}",
            "fixed.sharpness_subset=64",
        ]
    if data_root is None:
        # Crop and flip by 4 pixels would change an 8x8 digit.
        sets += ["dataset=digits", "fixed.augment=false"]
    if args.sweep_model:
        sets.append(f"model={args.sweep_model}")
    sets += args.sweep_set
    print(f"sweep_settings: {' '.join(sets)}")
    here = os.getcwd()
    # MLflow puts a SQLite store's artifacts under the working folder: keep them in the temp one.
    os.chdir(storage)
    try:
        start = time.perf_counter()
        plan = prepare(
            str(SPACE_FILE),
            sets,
            data_root=None if data_root is None else str(data_root),
            tracking_uri=f"sqlite:///{storage}/mlflow.db",
            storage_path=str(storage / "runs"),
        )
        cells = run_sweep(plan)
        wall = time.perf_counter() - start
    finally:
        os.chdir(here)
    rows = summarize(plan, cells)
    for cell in cells:
        for trial in cell.trials.values():
            m = trial.metrics
            print(
                f"sweep_trial: {cell.cell.label} {trial.optimizer} {trial.status} epochs={m.get('epoch')} "
                f"val_error={fmt(m.get('val_error'), 4)} test_error={fmt(m.get('test_error'), 4)}"
            )
    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    experiment = client.get_experiment_by_name(plan.sweep.name)
    runs = client.search_runs([experiment.experiment_id], "tags.`samtune.role` = 'trial'")
    expected = plan.sweep.trials * len(cells)
    print(f"sweep_wall_s: {wall:.1f}")
    print(f"sweep_mlflow_trial_runs: {len(runs)} of {expected}")
    out = {}
    # The ratios line carries the first cell (40% noise unless --sweep-set changed the cells).
    for row in rows:
        for family in ("sgd", "sam"):
            best = row[family]
            value = best.metrics.get("test_error") if best is not None else None
            out.setdefault(f"sweep_{family}_test_error", value)
            print(
                f"sweep_{family}_test_error: {fmt(value, 4)}  ({row['cell']}"
                + (f", best {family} trial by val_error: {best.trial_id}, {best.status})" if best else ")")
            )
    if len(runs) != expected or any(v is None for v in out.values()):
        raise RuntimeError(f"the sweep recorded {len(runs)} of {expected} trials in MLflow, best: {out}")
    return out


# ----------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DATA_ROOT,
        help=f"where CIFAR-10 is (a folder or the tarball; default {DATA_ROOT})",
    )
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry run even where there are GPUs")
    parser.add_argument("--skip", action="append", default=[], choices=PARTS, help="leave a part out; repeatable")
    parser.add_argument("--model", help="parts 1-4 (default resnet18; dry run cnn)")
    parser.add_argument("--batch", type=int, default=128, help="per-GPU batch of parts 1-4")
    parser.add_argument("--subset", type=int, help="training images of parts 1-3 (default all; dry run 1024)")
    parser.add_argument("--test-subset", type=int, help="test images evaluated (default all; dry run 256)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), help="precision of parts 1 and 4 (default bf16; dry run fp32)"
    )
    parser.add_argument("--precision-steps", type=int, help="SAM steps per precision (default 300; dry run 8)")
    parser.add_argument("--loss-rtol", type=float, default=0.1, help="bf16/fp16 final loss 'close' to fp32's")
    parser.add_argument(
        "--timed-steps", type=int, help="timed steps per variant and round in part 3, 3 rounds (default 10; dry run 2)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, help="untimed steps first, compilation included (default 5; dry run 3)"
    )
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; dry run eager)")
    parser.add_argument("--workers-subset", type=int, help="training images of part 4 (default 20000; dry run 512)")
    parser.add_argument("--workers-epochs", type=int, help="epochs of part 4, the last timed (default 2; dry run 1)")
    parser.add_argument("--epochs", type=int, help="sweep epochs (default 30; dry run 1)")
    parser.add_argument("--trials", type=int, help="sweep trials per optimizer (default 2; dry run 1)")
    parser.add_argument("--sweep-subset", type=int, help="sweep training images (default 10000; dry run 512)")
    parser.add_argument("--sweep-model", help="sweep model (default the file's resnet32; dry run cnn)")
    parser.add_argument(
        "--sweep-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further `samtune sweep --set` override, applied last; repeatable",
    )
    parser.add_argument("--threads", type=int, help="torch threads in this process (default all)")
    args = parser.parse_args()
    started = time.perf_counter()

    # Ray Train as the sweep runs it, chosen when Ray Train is first imported: so before
    # anything imports Ray.
    apply_ray_env()
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        print("gpu: none found (torch.cuda.is_available() is False); CPU dry run of the same code paths")
    elif args.dry_run:
        print(f"gpu: {gpus} found, --dry-run: CPU dry run of the same code paths")
    else:
        names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
        print(f"gpu: {gpus} x {', '.join(names)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    args.gpus = 0 if args.dry_run else gpus
    for key, value in (GPU if args.gpus else DRY).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "fp16" and not args.gpus:
        parser.error("--precision fp16 needs a GPU")
    if args.gpus and args.precision == "bf16" and not torch.cuda.is_bf16_supported():
        print(f"precision: fp16, as {torch.cuda.get_device_name(0)} has no bf16")
        args.precision = "fp16"
    device = torch.device("cuda", 0) if args.gpus else torch.device("cpu")

    from samtune.data.dataset import DataNotFoundError
    from samtune.data.load import load_dataset
    from samtune.data.scenarios import build_scenario

    # CIFAR-10 from --data-root, decoded once here into the tensor cache every later load reads.
    data_root: Path | None = args.data_root.resolve()
    try:
        load_dataset("cifar10", data_root, download=False)
        data = {"dataset": "cifar10", "data_root": str(data_root)}
    except DataNotFoundError:
        if args.gpus:
            parser.error(f"CIFAR-10 not found in {args.data_root}; pass --data-root (see shared/data/README.md)")
        print(f"data: no CIFAR-10 in {args.data_root}; the dry run uses the embedded digits")
        data, data_root = {"dataset": "digits"}, None
    print(
        f"data: {data['dataset']}{'' if data_root is None else f' from {data_root}'}; model {args.model}, "
        f"batch {args.batch}, {time.perf_counter() - started:.1f} s to here",
        flush=True,
    )

    figures: dict = {}
    failed: list[str] = []
    scenario = None
    with tempfile.TemporaryDirectory(prefix="samtune-gpu-check-") as tmp:
        for part in PARTS:
            if part in args.skip:
                print(f"{part}: skipped (--skip)")
                continue
            print(f"\n== {part} ==", flush=True)
            part_start = time.perf_counter()
            try:
                if part in ("precision", "compile") and scenario is None:
                    scenario = build_scenario({**data, "data_subset": args.subset, "seed": 0})
                if part == "epoch":
                    figures.update(epoch_times(args, data))
                elif part == "precision":
                    figures.update(precision_losses(args, scenario, device))
                elif part == "compile":
                    figures.update(step_speed(args, scenario, device))
                elif part == "workers":
                    figures.update(data_parallel(args, data, str(Path(tmp) / "train")))
                else:
                    figures.update(sweep(args, data_root, Path(tmp)))
            except Exception as exc:  # noqa: BLE001  one part failing must not hide the others' figures
                figures.update(getattr(exc, "figures", {}))
                failed.append(part)
                if not isinstance(exc, PartFailed):  # whose tracebacks are printed already
                    traceback.print_exc()
                print(f"{part}: FAILED ({type(exc).__name__}: {' '.join(str(exc).split())[:500]})")
            print(f"{part}_s: {time.perf_counter() - part_start:.1f}", flush=True)
        if "ray" in sys.modules:
            import ray

            ray.shutdown()

    if "sam_samples_per_s" in figures and "nccl_samples_per_s" in figures:
        print(f"nccl/1gpu_samples_per_s: {figures['nccl_samples_per_s'] / figures['sam_samples_per_s']:.2f}")
    print(f"\ntotal_s: {time.perf_counter() - started:.1f}")
    if failed:
        print(f"failed: {' '.join(failed)}")
    keys = [
        ("sam/sgd_epoch", 2),
        ("bf16_loss_rel_diff", 4),
        ("fp16_loss_rel_diff", 4),
        ("all_finite", 0),
        ("compile/eager", 2),
        ("channels_last/eager", 2),
        ("nccl_samples_per_s", 1),
        ("gloo_2w_samples_per_s", 1),
        ("sweep_sgd_test_error", 4),
        ("sweep_sam_test_error", 4),
    ]
    print("ratios: " + " ".join(f"{key}={fmt(figures.get(key), digits)}" for key, digits in keys))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

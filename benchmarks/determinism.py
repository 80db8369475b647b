"""The main job under several conditions: does it give the same answer, and what does the
deterministic search cost?

Runs `samtune sweep search_spaces/noisy_digits.py` once per condition, each in a folder of its
own, one after another on this machine:

- `quiet`: as shipped (deterministic search), nothing else running;
- `busy`: the same beside a process spinning on one core;
- `serial`: the same with one trial at a time (`--set max_concurrent=1`);
- `async`: `--set deterministic=false`, today's asynchronous scheduling, nothing else running
  (the baseline of the cost ratio).

For each it prints the wall time, the trial-epochs the search ran against its full budget
(what early stopping saved), the trials it stopped, a digest of everything the sweep decided
(every trial's settings, stop epoch and errors, every confirmation run's test error) and the
verdict table. Ends with `same answer: yes/no` over the deterministic conditions and
`ratios: deterministic/async wall=X.XX` (target <= 1.10; early stopping's saving target >= 30%).

    python benchmarks/determinism.py [--conditions quiet,busy,serial,async] [--folder /tmp/det]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "search_spaces" / "noisy_digits.py"
EXTRA = {"quiet": [], "busy": [], "serial": ["--set", "max_concurrent=1"], "async": ["--set", "deterministic=false"]}
SPIN = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"


def run(condition: str, folder: Path) -> float:
    """Wall seconds of the main job in `folder` under `condition` (exit status 0 required)."""
    folder.mkdir(parents=True, exist_ok=False)
    cmd = [
        sys.executable,
        "-m",
        "samtune.cli",
        "sweep",
        str(STUDY),
        "--storage-path",
        str(folder / "runs"),
        "--tracking-uri",
        f"sqlite:///{folder}/mlflow.db",
        "--no-report",
        *EXTRA[condition],
    ]
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if condition == "busy" else None
    start = time.perf_counter()
    try:
        with open(folder / "out.log", "w") as log:
            code = subprocess.run(
                cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            ).returncode
    finally:
        if spinner is not None:
            spinner.send_signal(signal.SIGKILL)
            spinner.wait()
    if code != 0:
        raise SystemExit(f"{condition}: the sweep exited {code}; see {folder / 'out.log'}")
    return time.perf_counter() - start


def decided(folder: Path) -> dict:
    """What the sweep decided, from its MLflow store: a digest of its trials and confirmation
    runs, the search's trial-epochs against its budget, and the verdict table."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    exp = client.get_experiment_by_name("noisy-digits")
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    cells = {r.info.run_id: r.data.tags.get("samtune.cell") for r in runs if r.data.tags.get("samtune.role") == "cell"}
    trials, reruns, ran, budget = [], [], 0, 0
    for r in runs:
        role, params, metrics = r.data.tags.get("samtune.role"), r.data.params, r.data.metrics
        cell = cells.get(r.data.tags.get("mlflow.parentRunId"))
        if role == "trial":
            ran += int(metrics.get("epoch", 0))
            budget += int(params["epochs"])
            settings = {k: v for k, v in params.items() if k in ("optimizer", "lr", "rho", "m", "trial_number")}
            trials.append(
                [
                    cell,
                    settings,
                    r.data.tags.get("samtune.status"),
                    metrics.get("epoch"),
                    metrics.get("val_error"),
                    metrics.get("test_error"),
                ]
            )
        elif role in ("confirm", "ablation"):
            reruns.append(
                [cell, r.data.tags.get("samtune.confirms"), r.data.tags.get("samtune.seed"), metrics.get("test_error")]
            )
    trials.sort(key=lambda t: (t[0], int(t[1]["trial_number"])))
    reruns.sort(key=lambda t: (t[0], t[1], int(t[2])))
    verdicts = (folder / "runs" / "noisy-digits" / "verdicts" / "verdicts.md").read_text()
    digest = hashlib.sha256(json.dumps([trials, reruns], sort_keys=True).encode()).hexdigest()[:16]
    return {
        "digest": digest,
        "epochs_run": ran,
        "budget": budget,
        "runs": len(reruns),
        "stopped": sum(t[2] == "stopped" for t in trials),
        "verdicts": verdicts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", default="quiet,busy,serial,async")
    parser.add_argument("--folder", default=f"/tmp/samtune-determinism-{os.getpid()}")
    args = parser.parse_args()
    results = {}
    for condition in args.conditions.split(","):
        wall = run(condition, Path(args.folder) / condition)
        results[condition] = {"wall_s": wall, **decided(Path(args.folder) / condition)}
        r = results[condition]
        print(
            f"{condition}: {wall / 60:.0f} min {wall % 60:.0f} s; search ran {r['epochs_run']} of {r['budget']} "
            f"trial-epochs ({1 - r['epochs_run'] / r['budget']:.0%} saved by early stopping, {r['stopped']} "
            f"trials stopped); {r['runs']} confirmation runs; digest {r['digest']}",
            flush=True,
        )
        print(r["verdicts"], flush=True)
    deterministic = [c for c in results if c != "async"]
    same = len({(results[c]["digest"], results[c]["verdicts"]) for c in deterministic}) == 1
    print(f"same answer: {'yes' if same else 'no'} ({', '.join(deterministic)})")
    if "async" in results and "quiet" in results:
        print(f"ratios: deterministic/async wall={results['quiet']['wall_s'] / results['async']['wall_s']:.2f}")


if __name__ == "__main__":
    main()

"""Where a trial's workers run: the Ray resources of each worker (checked against the cluster's
nodes before a trial asks for them), the trial process's own share, the `torch.distributed`
backend, the share of a machine's memory a worker may plan on, and the nodes the workers landed on.

>>> worker_resources({"workers": 2, "cpus_per_worker": None, "use_gpu": False}, cluster_cpus=2)
{'CPU': 1.0}
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from samtune.trial.config import TrialConfigError


def memory_share(device: torch.device) -> float:
    """The share of its machine's free memory this process may plan on (its CPU RAM, or its GPU's).

    Trials side by side on a machine reach their end-of-training sharpness measurement at about
    the same time; each counting on all the free memory for its Hessian graphs would together
    take more than there is (ResNet-32 on 1,024 examples kept 10 GB). So a Ray task gets the
    fraction of the machine's CPUs it holds (of one GPU, on a GPU); outside Ray, all of it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 1.0
    try:
        context = ray.get_runtime_context()
        held = context.get_assigned_resources()
        node = next(n for n in ray.nodes() if n.get("NodeID") == context.get_node_id())
        total = node.get("Resources", {})
    except Exception:  # noqa: BLE001  no runtime context (a driver): plan on the whole machine
        return 1.0
    return resource_share(held, total, "GPU" if device.type == "cuda" else "CPU")


def resource_share(held: dict[str, float], total: dict[str, float], kind: str) -> float:
    """``held[kind]`` over the machine's ``total[kind]`` CPUs, or of one GPU for "GPU" (a GPU's
    memory is per device), in (0, 1]; 1 where nothing is held or known."""
    amount = float(held.get(kind, 0.0))
    whole = 1.0 if kind == "GPU" else float(total.get(kind, 0.0))
    if amount <= 0 or whole <= 0:
        return 1.0
    return min(1.0, amount / whole)


def node_placement(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order; empty outside Ray. A collective: every rank
    calls it (each decides by the same test, so none waits alone)."""
    node = ""
    if "ray" in sys.modules:
        try:
            ray = sys.modules["ray"]
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        except Exception:  # noqa: BLE001  not a Ray process after all
            node = ""
    nodes = [node]
    if world > 1:
        nodes = [""] * world
        dist.all_gather_object(nodes, node)
    return nodes if all(nodes) else []


# Ray's marker of the head node, a resource of 1 only that node has.
HEAD_NODE = "node:__internal_head__"


def trial_driver_resources(cluster: dict[str, float]) -> dict[str, float]:
    """Tune resources of a multi-worker trial's own process, on a cluster of these totals.

    It only waits on its workers (as Ray Train's controller, which holds no CPU either), so it
    holds no CPU and is pinned to the head node: the one node whose loss ends the cluster anyway.
    A trial process lost with a worker node would leave its worker group's placement group held
    (Ray ties it to the sweep's job, not to that process), and the restarted trial could never
    place its workers. A cluster without the head marker gets a token CPU share instead (Tune
    places nothing that asks for nothing).
    """
    if cluster.get(HEAD_NODE):
        return {"cpu": 0.0, "gpu": 0.0, HEAD_NODE: 0.001}
    return {"cpu": 0.01, "gpu": 0.0}


def worker_resources(
    cfg: dict[str, Any],
    cluster_cpus: float | None = None,
    cluster_gpus: float | None = None,
    nodes: list[dict[str, float]] | None = None,
    driver_cpu: float = 0.0,
) -> dict[str, float]:
    """Ray resources of one training worker of a multi-worker trial: {"CPU": c} (+ {"GPU": g}).

    CPUs: `cpus_per_worker`, else what fits beside the trial's driver (`driver_cpu`, see
    `trial_driver_resources`), at most 1 each, in steps of 0.1 (1 each for 2 workers on 2 cores,
    or one per node on two 1-CPU nodes). GPUs (`use_gpu`): `gpus_per_worker`, else 1 each, or an
    equal share when the cluster has fewer GPUs than workers.

    The cluster totals and `nodes` (each alive node's resources, {"CPU": ..., "GPU": ...})
    default to the connected Ray cluster's (`ray.cluster_resources()`, `ray.nodes()`); with the
    totals given and no `nodes`, the cluster is taken as one node holding them. Raises
    `TrialConfigError` when the request can never be placed: more than the cluster totals, one
    worker larger than any single node, or more workers than the nodes hold one by one (a worker
    never spans nodes; Ray Train would otherwise wait, and retry, forever).
    """
    if cluster_cpus is None or (cfg["use_gpu"] and cluster_gpus is None):
        import ray

        total = ray.cluster_resources()
        cluster_cpus = float(total.get("CPU", 0.0)) if cluster_cpus is None else cluster_cpus
        cluster_gpus = float(total.get("GPU", 0.0)) if cluster_gpus is None else cluster_gpus
        if nodes is None:
            nodes = [
                {"CPU": float(n["Resources"].get("CPU", 0.0)), "GPU": float(n["Resources"].get("GPU", 0.0))}
                for n in ray.nodes()
                if n.get("Alive")
            ]
    if nodes is None:
        nodes = [{"CPU": cluster_cpus, "GPU": cluster_gpus or 0.0}]
    workers = cfg["workers"]
    per = cfg["cpus_per_worker"]
    if per is None:
        per = math.floor(max(0.1, min(1.0, (cluster_cpus - driver_cpu) / workers)) * 10 + 1e-9) / 10
    if not per > 0:
        raise TrialConfigError(f"cpus_per_worker must be > 0, got {per!r}")
    if driver_cpu + per * workers > cluster_cpus + 1e-9:
        held = f" (and {driver_cpu:g} for the trial's driver)" if driver_cpu else ""
        raise TrialConfigError(
            f"{workers} workers x {per:g} CPU need {per * workers:g} CPUs{held}, but the Ray cluster has "
            f"{cluster_cpus:g}; lower workers or cpus_per_worker"
        )
    resources = {"CPU": per}
    gpu = 0.0
    if cfg["use_gpu"]:
        gpu = _worker_gpus(cfg["gpus_per_worker"], workers, cluster_gpus)
        resources["GPU"] = gpu
    _check_placement(workers, per, gpu, nodes)
    return resources


def _worker_gpus(gpu: float | None, workers: int, cluster_gpus: float | None) -> float:
    """GPUs of one worker of a `use_gpu` trial: `gpus_per_worker` (``gpu``), else 1 each, or an
    equal share when the cluster has fewer GPUs than workers. Raises `TrialConfigError` when the
    cluster has no GPU, for a share that is neither in (0, 1] nor whole, or more than it has."""
    if not cluster_gpus:
        raise TrialConfigError("use_gpu=True but the Ray cluster has no GPU")
    if gpu is None:
        gpu = 1.0 if cluster_gpus >= workers else math.floor(cluster_gpus / workers * 100) / 100
    if not gpu > 0 or (gpu > 1 and not float(gpu).is_integer()):
        raise TrialConfigError(f"gpus_per_worker must be a fraction in (0, 1] or a whole number, got {gpu!r}")
    if gpu * workers > cluster_gpus + 1e-9:
        raise TrialConfigError(
            f"{workers} workers x {gpu:g} GPU need {gpu * workers:g} GPUs, but the "
            f"Ray cluster has {cluster_gpus:g}; lower workers or gpus_per_worker"
        )
    return gpu


def _worker_slots(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of (cpus, gpus) one node holds. A fractional GPU share must fit within
    one GPU, so a node of G GPUs holds G x floor(1 / share) of them."""
    slots = math.floor(node.get("CPU", 0.0) / cpus + 1e-9)
    if gpus > 0:
        whole = math.floor(node.get("GPU", 0.0) + 1e-9)
        if gpus >= 1:
            by_gpu = math.floor(node.get("GPU", 0.0) / gpus + 1e-9)
        else:
            by_gpu = whole * math.floor(1 / gpus + 1e-9)
        slots = min(slots, by_gpu)
    return max(0, int(slots))


def _check_placement(workers: int, cpus: float, gpus: float, nodes: list[dict[str, float]]) -> None:
    want = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    if not nodes:
        raise TrialConfigError("the Ray cluster has no alive node to place training workers on")
    if not any(_worker_slots(n, cpus, gpus) for n in nodes):
        largest_cpu = max(n.get("CPU", 0.0) for n in nodes)
        largest_gpu = max(n.get("GPU", 0.0) for n in nodes)
        raise TrialConfigError(
            f"one training worker needs {want} on a single node, but the largest node has "
            f"{largest_cpu:g} CPU"
            + (f" and {largest_gpu:g} GPU" if gpus else "")
            + "; lower cpus_per_worker"
            + (" or gpus_per_worker" if gpus else "")
        )
    slots = sum(_worker_slots(n, cpus, gpus) for n in nodes)
    if slots < workers:
        raise TrialConfigError(
            f"{workers} workers of {want} each do not fit: the Ray cluster's {len(nodes)} node(s) "
            f"hold {slots} such workers (a worker never spans nodes); lower workers, "
            "cpus_per_worker" + (" or gpus_per_worker" if gpus else "")
        )


def distributed_backend(cfg: dict[str, Any], resources: dict[str, float]) -> str:
    """`backend`, else NCCL when every worker has a GPU of its own and gloo otherwise (CPU
    workers, or workers sharing a GPU, which NCCL refuses)."""
    if cfg["backend"] is not None:
        return cfg["backend"]
    return "nccl" if cfg["use_gpu"] and resources.get("GPU", 0) >= 1 else "gloo"


START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _held_cpu() -> float:
    """The CPUs this trial's own process holds: what the sweep gives it (`trial_driver_resources`)
    or what a user's own Tuner does, so its workers are sized to fit beside it either way."""
    import ray.tune

    try:
        return float(ray.tune.get_context().get_trial_resources().required_resources.get("CPU", 0.0))
    except Exception:  # noqa: BLE001  not inside a Tune trial after all
        import ray

        return trial_driver_resources(ray.cluster_resources())["cpu"]


def trial_worker_resources(cfg: dict[str, Any], trial_dir: str) -> dict[str, float]:
    """The trial's worker resources: sized to the cluster when it first starts, then kept in its
    folder. A trial restarted after a node loss asks for what it first ran with: sized again to a
    smaller cluster it would shrink its workers' CPUs, or share GPUs over gloo instead of NCCL,
    and its speed (and backend) would change with the cluster it happened to find."""
    path = os.path.join(trial_dir, "worker_resources.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    resources = worker_resources(cfg, driver_cpu=_held_cpu())
    os.makedirs(trial_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(resources, f)
    os.replace(path + ".tmp", path)
    return resources


class WorkerPlacementError(RuntimeError):
    """A trial's worker group could not be placed on the Ray cluster in the time allowed."""


def placement_message(cfg: dict[str, Any], resources: dict[str, float]) -> str:
    import ray

    per = " + ".join(f"{v:g} {k}" for k, v in resources.items())
    wait = cfg["placement_timeout_s"]
    try:
        free = (
            ", ".join(f"{v:g} {k}" for k, v in sorted(ray.available_resources().items()) if k in ("CPU", "GPU"))
            or "nothing"
        )
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # noqa: BLE001  the cluster itself is gone: say what was asked
        free, nodes = "unknown", 0
    return (
        f"{cfg['workers']} training workers of {per} each could not be placed within "
        f"placement_timeout_s={wait:g} s: "
        f"the Ray cluster has {nodes} alive node(s) and {free} free; bring the missing capacity "
        "back, or lower workers, cpus_per_worker or gpus_per_worker"
    )

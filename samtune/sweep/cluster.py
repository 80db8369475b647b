"""The sweep's machine and cluster, checked and started: the dataset read once in the driver,
the storage folder writable (and reached by every node of a cluster), the cluster address
answering, and Ray started or joined.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

import torch

from samtune.contract.messages import first_line
from samtune.data.dataset import DataNotFoundError
from samtune.data.load import load_dataset
from samtune.sweep.errors import SweepError
from samtune.sweep.ray_env import apply_ray_env
from samtune.sweep.study import Sweep

MIN_FREE_BYTES = 200 * 2**20


def check_data(sweep: Sweep) -> None:
    """Load the dataset once in the driver: a missing or malformed dataset is named before any
    trial starts, and the decoded-tensor cache is built once instead of in every trial."""

    try:
        load_dataset(sweep.dataset, sweep.fixed.get("data_root"))
    except (DataNotFoundError, ValueError) as exc:
        raise SweepError(f"dataset {sweep.dataset!r}: {exc}") from None


def storage_folder(storage_path: str) -> Path:
    """The absolute storage folder ``storage_path`` names, with its links followed; SweepError
    when they go round in a loop, which no folder can be created or read through."""
    try:
        return Path(storage_path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:
        # Python 3.11 and 3.12 say RuntimeError("Symlink loop from ..."), later ones OSError(ELOOP).
        where = getattr(exc, "filename", None) or str(exc).rpartition(" from ")[2].strip("'")
        raise SweepError(
            f"--storage-path {storage_path}: the links at {where} point round in a loop; "
            f"give a storage path that leads to a folder"
        ) from None


def check_storage(storage: Path) -> None:
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".samtune-write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise SweepError(f"--storage-path {storage}: cannot write there ({exc.strerror or exc})") from None
    free = shutil.disk_usage(storage).free
    if free < MIN_FREE_BYTES:
        raise SweepError(
            f"--storage-path {storage}: only {free / 2**20:.0f} MiB free; a sweep needs at least "
            f"{MIN_FREE_BYTES / 2**20:.0f} MiB for checkpoints"
        )


def check_shared_storage(storage: Path) -> None:
    """Refuse a storage folder that some node of the connected Ray cluster cannot reach.

    Trials write their checkpoints there and a trial restarted on another node resumes from
    them, so on a cluster of several nodes the folder must be one every node mounts. Each alive
    node is asked, by a task pinned to it, to read a file written here; raises SweepError naming
    the nodes that could not.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    probe = storage / f".samtune-shared-{token[:8]}"
    probe.write_text(token)
    try:
        blind = [
            f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"
            for n, seen in zip(nodes, read_on_every_node(nodes, str(probe), token))
            if not seen
        ]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise SweepError(
            f"--storage-path {storage}: {len(blind)} of the Ray cluster's {len(nodes)} nodes cannot "
            f"reach it ({', '.join(blind)}); every node must reach the same path, so put it on a "
            f"file system all nodes mount"
        )


def read_on_every_node(nodes: list[dict], path: str, token: str, timeout_s: float = 120.0) -> list[bool]:
    """Whether each node's processes read `token` from `path` (False: a node that cannot, or
    does not answer in time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_reads_token)
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path, token)
        for n in nodes
    ]
    seen = []
    for ref in refs:
        try:
            seen.append(bool(ray.get(ref, timeout=timeout_s)))
        except Exception:  # noqa: BLE001  a node that cannot run the probe cannot be relied on either
            seen.append(False)
    return seen


def _reads_token(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def check_address(address: str) -> None:
    """Fail within seconds when a Ray cluster address does not answer (ray.init would hang)."""
    if address == "auto":
        return  # ray.init("auto") fails fast by itself when there is no local cluster
    if address.startswith("ray://"):
        # Ray Client runs Tune's driver on the cluster: the callbacks that write MLflow, draw the
        # live view and rebuild finished trials from the local sweep folder would run there, not
        # here, and the sweep would record nothing.
        raise SweepError(
            f"--address {address}: Ray Client (ray://) is not supported, since the sweep's "
            f"driver must run where samtune runs; run samtune on a node of that cluster with "
            f"--address auto (and a --storage-path every node shares)"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--address {address}: expected auto or host:port of a Ray cluster this machine is a node of")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise SweepError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def start_ray(address: str | None) -> None:
    """Join the cluster at `address` (``auto``: the one `ray start` runs on this machine), else
    the one `RAY_ADDRESS` names (as inside a Ray job), else start a private local Ray instance,
    even when another runs here: its resources are this sweep's alone."""
    import ray

    if ray.is_initialized():
        return
    source = f"--address {address}"
    if not address and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        source = f"RAY_ADDRESS={address}"
    runtime_env = apply_ray_env()
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SweepError(f"{source}: cannot join that Ray cluster ({first_line(exc)})") from None
    else:
        # Explicit resources: what this machine has (or the CPUs this process may use), so Ray
        # neither over- nor under-packs trials. "local" starts a new instance where a bare
        # ray.init() would join a `ray start` cluster (and refuse these resources).
        cpus = local_cpus()
        ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=_local_gpus(),
            runtime_env=runtime_env,
            log_to_driver=False,
            logging_level=logging.ERROR,
            dashboard_host="127.0.0.1",
        )


def local_cpus() -> int:
    """The CPUs a Ray instance this sweep starts gets: those this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_resources(address: str | None) -> dict[str, float] | None:
    """The cluster a sweep will start on this machine, known before starting it: its CPUs and
    GPUs; None when the sweep joins a cluster (``address`` or ``RAY_ADDRESS``), whose size only
    that cluster can say."""
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    return {"CPU": float(local_cpus()), "GPU": float(_local_gpus())}


def _local_gpus() -> int:
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001  a broken CUDA install: train on CPU
        return 0

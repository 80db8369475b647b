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
from typing import NamedTuple

import grpc
import torch

from samtune.contract.messages import first_line, masked
from samtune.data.dataset import DataNotFoundError
from samtune.data.load import load_dataset
from samtune.sweep.errors import SweepError
from samtune.sweep.ray_env import (
    AUTH_MODE_VAR,
    DEFAULT_TOKEN_FILE,
    TOKEN_PATH_VAR,
    TOKEN_VAR,
    apply_ray_env,
    auth_tokens,
)
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


def check_shared_storage(storage: Path | str) -> None:
    """Refuse storage that some node of the connected Ray cluster cannot reach.

    Trials write their checkpoints there and a trial restarted on another node resumes from
    them, so on a cluster of several nodes the folder must be one every node mounts, or object
    storage every node has credentials for (``storage`` is then its URI). Each alive node is
    asked, by a task pinned to it, to read a file written here; raises SweepError naming the
    nodes that could not.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    probe_name = f".samtune-shared-{token[:8]}"
    remote = isinstance(storage, str) and "://" in storage
    if remote:
        import pyarrow.fs as pafs

        base, sep, query = str(storage).partition("?")
        probe = f"{base.rstrip('/')}/{probe_name}{sep}{query}"
        fs, where = pafs.FileSystem.from_uri(probe)
        with fs.open_output_stream(where) as fh:
            fh.write(token.encode())
    else:
        probe = str(Path(storage) / probe_name)
        Path(probe).write_text(token)
    try:
        blind = [
            f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"
            for n, seen in zip(nodes, read_on_every_node(nodes, probe, token))
            if not seen
        ]
    finally:
        if remote:
            fs.delete_file(where)
        else:
            Path(probe).unlink(missing_ok=True)
    if blind:
        fix = (
            "give every node credentials for the bucket"
            if remote
            else "every node must reach the same path, so put it on a file system all nodes mount"
        )
        raise SweepError(
            f"--storage-path {masked(str(storage).partition('?')[0])}: {len(blind)} of the Ray cluster's "
            f"{len(nodes)} nodes cannot reach it ({', '.join(blind)}); {fix}"
        )


def read_on_every_node(nodes: list[dict], path: str, token: str, timeout_s: float = 120.0) -> list[bool]:
    """Whether each node's processes read `token` from `path` (False: a node that cannot, or
    does not answer in time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(reads_token)
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


def reads_token(path: str, token: str) -> bool:
    """Whether `path` (a file, or an object-storage URI) holds `token`, as this node's processes
    see it: the task each node runs for `check_shared_storage`."""
    try:
        if "://" in path:  # object storage: read with the node's own credentials
            import pyarrow.fs as pafs

            fs, where = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(where) as fh:
                return bytes(fh.read()).decode() == token
        with open(path) as f:
            return f.read() == token
    except Exception:  # noqa: BLE001  missing, denied, no credentials, no connection: not reached
        return False


class Cluster(NamedTuple):
    """The Ray cluster a sweep joins: its GCS host:port, and the setting that named it."""

    address: str
    source: str


def check_address(address: str | None) -> Cluster | None:
    """The Ray cluster a sweep joins, checked within seconds (ray.init would wait, or retry a
    refused token for 30 s): `address`, else `RAY_ADDRESS`; ``auto`` means `RAY_ADDRESS`, else the
    one cluster running on this machine. None: the sweep starts a private Ray instance.

    Raises SweepError, in one line that names the fix, for a Ray Client address, a malformed one,
    one where nothing answers, ``auto`` with no cluster or several here, and a cluster that
    requires an auth token this process cannot present (one it can present, Ray is set to send).
    """
    if address:
        source, given = f"--address {address}", address
        if address == "auto" and os.environ.get("RAY_ADDRESS"):
            source, given = f"--address auto (RAY_ADDRESS={os.environ['RAY_ADDRESS']})", os.environ["RAY_ADDRESS"]
    elif os.environ.get("RAY_ADDRESS"):
        given = os.environ["RAY_ADDRESS"]
        source = f"RAY_ADDRESS={given}"
    else:
        return None
    if given.startswith("ray://"):
        # Ray Client runs Tune's driver on the cluster: the callbacks that write MLflow, draw the
        # live view and rebuild finished trials from the local sweep folder would run there, not
        # here, and the sweep would record nothing.
        raise SweepError(
            f"{source}: Ray Client (ray://) is not supported, since the sweep's "
            f"driver must run where samtune runs; run samtune on a node of that cluster with "
            f"--address auto (and a --storage-path every node shares)"
        )
    target = the_local_cluster(source) if given == "auto" else given
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"{source}: expected auto or host:port of a Ray cluster this machine is a node of")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise SweepError(f"{source}: no Ray cluster answers there ({exc.strerror or exc})") from None
    present_token(target, source)
    return Cluster(target, source)


def local_clusters() -> list[str]:
    """The GCS addresses of the Ray clusters running on this machine (`ray start`, or a Ray
    instance another process started), found as Ray finds them for ``auto``."""
    from ray._private.services import find_gcs_addresses

    find_gcs_addresses.cache_clear()  # type: ignore[attr-defined]  # Ray adds it to the function
    return sorted(find_gcs_addresses())


def the_local_cluster(source: str) -> str:
    """The one Ray cluster on this machine that ``auto`` joins; SweepError when there is none, or
    several (Ray would take the last one `ray start` made, which may not be the one meant)."""
    found = local_clusters()
    if not found:
        raise SweepError(
            f"{source}: no Ray cluster runs on this machine; start one with `ray start --head`, "
            f"or give --address host:port of one"
        )
    if len(found) > 1:
        raise SweepError(
            f"{source}: {len(found)} Ray clusters run on this machine ({', '.join(found)}); "
            f"say which to join with --address host:port"
        )
    return found[0]


def present_token(address: str, source: str) -> None:
    """Have Ray send this machine's auth token to a cluster that requires one, or raise SweepError
    saying how to pass the cluster's token. Ray sends a token to an address it is given only when
    `RAY_AUTH_MODE=token`, and otherwise retries the refusal for 30 s before saying nothing of it."""
    if admits(address, None) is not False:
        return  # no token needed, or an answer of another kind that ray.init will explain
    how = (
        f"pass the cluster's token as {TOKEN_VAR}=<token> or {TOKEN_PATH_VAR}=<file> "
        f"(`ray get-auth-token` on its head node prints it)"
    )
    tokens = auth_tokens()
    if not tokens:
        raise SweepError(
            f"{source}: that Ray cluster requires an auth token and none was found here "
            f"({TOKEN_VAR}, {TOKEN_PATH_VAR}, {DEFAULT_TOKEN_FILE}); {how}"
        )
    (where, token), *others = tokens
    if not admits(address, token):
        accepted = [w for w, t in others if admits(address, t)]
        if accepted:
            # Ray sends the first token it finds; the variables set before the accepted one hide it.
            hiding = [w.partition("=")[0] for w, _ in tokens[: [w for w, _ in tokens].index(accepted[0])]]
            how = f"it accepts the one in {accepted[0]}: unset {' and '.join(hiding)}"
        raise SweepError(f"{source}: that Ray cluster refuses the auth token in {where}; {how}")
    os.environ[AUTH_MODE_VAR] = "token"
    from ray._raylet import Config  # type: ignore[attr-defined]  # compiled; its stub omits it

    # Ray reads the mode into its cached config at import; this re-reads it, as `ray start` does.
    Config.initialize("")


def admits(address: str, token: str | None, timeout_s: float = 5.0) -> bool | None:
    """Whether the Ray cluster at `address` answers a request carrying `token` (None: none):
    True, False when it refuses it as unauthenticated, None when it does not answer either way."""
    from ray._private.authentication.authentication_constants import (
        AUTHORIZATION_BEARER_PREFIX,
        AUTHORIZATION_HEADER_NAME,
    )
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = ((AUTHORIZATION_HEADER_NAME, AUTHORIZATION_BEARER_PREFIX + token),) if token else ()
    request = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]  # generated at run time
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            return False if exc.code() == grpc.StatusCode.UNAUTHENTICATED else None
    return True


def start_ray(address: str | None) -> None:
    """Join the cluster `check_address` names (``--address``, else `RAY_ADDRESS`), else start a
    private local Ray instance, even when another runs here: its resources are this sweep's alone."""
    import ray

    if ray.is_initialized():
        return
    cluster = check_address(address)
    runtime_env = apply_ray_env()
    if cluster:
        try:
            ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as exc:  # noqa: BLE001  whatever Ray raises, the sweep says which setting led there
            raise SweepError(f"{cluster.source}: cannot join that Ray cluster ({first_line(exc)})") from None
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

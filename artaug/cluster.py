"""Start or join Ray with the run's settings, and the checks a cluster of several nodes needs.

On more than one node every stage's output must be storage that all nodes see (s3://, gs://, or a
file system mounted at the same path everywhere): Ray Data writes and reads Parquet from whichever
node a task lands on. `init_ray(cfg, output=DIR)` refuses a node-local DIR there.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os

import ray

from artaug.config import RayConfig, Resources
from artaug.errors import ArtaugError

log = logging.getLogger(__name__)

# Each worker computes with the thread count its stage asks for; these keep BLAS pools from
# oversubscribing the cores before torch.set_num_threads runs.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Where the driver reads model weights from (set by `hub.*`, see artaug.hub) is passed on to the
# workers. Never the token: workers on each node read it from their own environment.
_FORWARDED_ENV = ("HF_HUB_CACHE", "HF_HUB_OFFLINE")


class SharedStorageError(ArtaugError, ValueError):
    """A node-local output path on a cluster whose other nodes cannot see it."""


def init_ray(cfg: RayConfig, output: str | None = None) -> None:
    """Join cfg.address, or start a private local Ray; a no-op when Ray is already up.

    With `output` (the stage's output folder), a node-local path on a cluster of several nodes is
    refused before any work starts (unless cfg.shared_filesystem says it is mounted everywhere).
    """
    if output is not None and not ray.is_initialized():
        check_output_storage(output, cfg, nodes=1, remote=_remote_address(cfg.address))
    if not ray.is_initialized():
        _start(cfg)
    _configure_ray_data()
    if output is not None:
        check_output_storage(output, cfg, nodes=alive_nodes())


def _configure_ray_data() -> None:
    """Ray Data settings for this driver's datasets (the context travels with each dataset)."""
    from ray.data import DataContext

    # Ray 2.60's Parquet reader V2 starts new footer-reader actors for every read and kills them after:
    # each stage input waited ~10 s for worker processes to boot on a 2-core machine (0.5 s with V1,
    # which reads footers in its read tasks): docs/platform.md has the measurements.
    DataContext.get_current().use_datasource_v2 = False


def _start(cfg: RayConfig) -> None:
    env = dict(_WORKER_ENV) | {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    # Under `ray job submit` Ray merges this runtime_env into the job's and refuses any variable both
    # set: the job's own value (it is in this driver's environment too) is kept.
    runtime_env = {"env_vars": {k: v for k, v in env.items() if k not in _job_env_vars()}}
    if cfg.address == "local":
        ray.init(
            address="local",  # a private Ray even when `ray start` runs a cluster on this machine
            num_cpus=cfg.num_cpus,
            object_store_memory=int(cfg.object_store_gb * 2**30),
            include_dashboard=cfg.include_dashboard,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    else:
        address = os.environ.get("RAY_ADDRESS") if cfg.address == "auto" else cfg.address
        ray.init(address=address or "auto", runtime_env=runtime_env)
    log.info("Ray resources: %s", ray.cluster_resources())


def _job_env_vars() -> set[str]:
    """Variables the submitted job's runtime_env sets (empty outside `ray job submit`)."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return set(((job_config.get("runtime_env") or {}).get("env_vars") or {}).keys())


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def check_output_storage(output: str, cfg: RayConfig, nodes: int, remote: bool = False) -> None:
    """Refuse a node-local `output` when other nodes may read or write it (several, or a remote Ray)."""
    if (nodes <= 1 and not remote) or cfg.shared_filesystem or not is_node_local(output):
        return
    where = f"the Ray cluster has {nodes} nodes" if nodes > 1 else f"Ray runs elsewhere ({cfg.address})"
    raise SharedStorageError(
        f"{output} is a path on this node's disk, but {where}: other nodes cannot read or write it."
        " Use s3:// or gs:// storage, or a file system mounted at the same path on every node"
        " with --set ray.shared_filesystem=true"
    )


def is_node_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _remote_address(address: str) -> bool:
    """An address naming another machine (ray://host:port or host:port), not this one."""
    if address in ("local", "auto"):
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name other than localhost


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def gpus_for(resources: Resources) -> float:
    """The GPUs one process asks for: the configured share, or (-1) one when the cluster has GPUs."""
    if resources.gpus >= 0:
        return resources.gpus
    return 1.0 if cluster_has_gpus() else 0.0


def ray_resources(resources: Resources) -> dict:
    """Ray's per-process options (num_cpus, num_gpus, label_selector) for a section's `Resources`."""
    options = {"num_cpus": resources.cpus, "num_gpus": gpus_for(resources)}
    if resources.node_labels:
        options["label_selector"] = label_selector(resources.node_labels)
    return options


def label_selector(node_labels: list[str]) -> dict[str, str] | None:
    """["key=value", ...] (a stage's node_labels) as Ray's label selector; None means any node."""
    return dict(item.split("=", 1) for item in node_labels) or None

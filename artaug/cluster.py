"""Start or join Ray with the run's settings."""

from __future__ import annotations

import logging
import os

import ray

from artaug.config import RayConfig

log = logging.getLogger(__name__)

# Each worker computes with the thread count its stage asks for; these keep BLAS pools from
# oversubscribing the cores before torch.set_num_threads runs.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(cfg: RayConfig) -> None:
    """Join cfg.address, or start a private local Ray; a no-op when Ray is already up."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(_WORKER_ENV)}
    if cfg.address == "local":
        ray.init(
            address="local",  # private: without it Ray joins a cluster another process started here
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


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0

"""The torch.distributed backend of the training workers, chosen where the workers run.

The driver cannot tell: on a cluster it runs on a CPU head while the workers hold GPUs, and a worker
Ray gave a logical GPU may find no CUDA at all (a simulated cluster, tests/multinode_scenario.py).
torch builds the NCCL process group eagerly, so "cpu:gloo,cuda:nccl" fails on a worker without CUDA
("ProcessGroupNCCL is only supported with GPUs, no GPUs found!"). Before the process group starts,
every worker is asked whether torch sees CUDA: all do -> "cpu:gloo,cuda:nccl", else "gloo".
"""

from __future__ import annotations

import dataclasses

from ray.train.torch.config import TorchConfig, _TorchBackend


@dataclasses.dataclass
class WorkerDeviceTorchConfig(TorchConfig):
    """TorchConfig whose backend the workers' devices decide (`backend` is set by the workers)."""

    @property
    def backend_cls(self):
        return _WorkerDeviceBackend


class _WorkerDeviceBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        cuda = all(worker_group.execute(_sees_cuda))
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        super().on_start(worker_group, dataclasses.replace(backend_config, backend=backend))


def _sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

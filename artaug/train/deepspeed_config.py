"""The DeepSpeed configuration of a training phase, and the process set-up DeepSpeed needs on CPU."""

from __future__ import annotations

import os

from artaug.config import TrainConfig


def deepspeed_config(t: TrainConfig, bf16: bool) -> dict:
    """ZeRO stage 1/2 with torch's AdamW (no fused-op build); bf16 with fp32 master weights on GPU."""
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accumulation,
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch.optim.AdamW instead of DeepSpeed's FusedAdam, which is JIT-compiled.
            "params": {"lr": t.learning_rate, "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 2**31,  # we log every step ourselves
        "wall_clock_breakdown": False,
    }
    if t.max_grad_norm > 0:
        config["gradient_clipping"] = t.max_grad_norm
    return config


def prepare_process(on_cpu: bool) -> None:
    """Call before deepspeed.initialize in a worker.

    On CPU, DeepSpeed's communication layer JIT-compiles a shared-memory all-reduce op with g++ at the
    first initialize (tens of seconds); gloo, which Ray Train's process group already uses, is enough,
    so the op is marked unavailable. Any op that is still built lands in a stable cache.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/artaug/torch_extensions"))
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    if on_cpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

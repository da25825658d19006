"""The DeepSpeed config of a training run, from `DistributedConfig` and the stage's batch settings.

The optimizer is always a torch optimizer handed to `deepspeed.initialize` (no JIT-compiled C++/CUDA
ops), so the config carries no "optimizer" or "scheduler" section, and CPU offload runs torch's AdamW
on the CPU partitions instead of DeepSpeedCPUAdam.
"""
from __future__ import annotations

from typing import Any, Literal

from binllm.config import ConfigError, DistributedConfig

Precision = Literal["bf16", "fp32"]

# Printing every N steps is DeepSpeed's default chatter; the training loop logs its own progress.
_QUIET_STEPS = 1 << 30


def llm_precision(dtype: str, use_gpu: bool) -> Precision:
    """bf16 on GPU unless llm.dtype asks for float32; fp32 on CPU unless it asks for bfloat16."""
    if dtype in ("float32", "tf32"):
        return "fp32"
    if dtype == "bfloat16":
        return "bf16"
    if dtype == "auto":
        return "bf16" if use_gpu else "fp32"
    raise ConfigError(f"config key 'llm.dtype': expected 'auto', 'float32', 'tf32' or 'bfloat16', got {dtype!r}")


def deepspeed_config(dist: DistributedConfig, *, micro_batch_size: int, grad_accum: int, world_size: int,
                     precision: Precision) -> dict[str, Any]:
    """ZeRO stage `dist.zero_stage` (offload options as configured) with micro-batch and accumulation."""
    if micro_batch_size < 1 or grad_accum < 1:
        raise ConfigError(f"micro_batch_size and grad_accum must be >= 1, got {micro_batch_size} and {grad_accum}")
    if dist.offload_params and dist.zero_stage != 3:
        raise ConfigError(
            f"config key 'distributed.offload_params': parameter offload needs zero_stage 3, got {dist.zero_stage}")
    if dist.offload_optimizer and dist.zero_stage == 0:
        raise ConfigError("config key 'distributed.offload_optimizer': optimizer offload needs zero_stage 1, 2 or 3")
    pin = dist.use_gpu
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.zero_stage:
        zero.update(contiguous_gradients=True, overlap_comm=dist.use_gpu)
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips to norm 1.0 unless told; the local loop never clips
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }

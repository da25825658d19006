"""The training loop's backend inside Ray Train workers: DeepSpeed ZeRO, checkpoints through Ray Train.

Every worker runs the same task code (encoder pretraining, LoRA tuning) with a `DeepSpeedBackend`:
`deepspeed.initialize` wraps the model with the torch optimizer and scheduler the task built (no
JIT-compiled ops), ZeRO stage and offload from `DistributedConfig`, bf16 on GPU and fp32 on CPU.

Checkpoints go to the run's Ray Train storage (local path or s3://) via `ray.train.report`: each rank
writes its DeepSpeed shards into a local folder and Ray merges the folders. Ray keeps the best
`num_to_keep` by validation AUC plus the latest. A restarted worker group (FailureConfig.max_failures)
and a re-submitted job with the same run name start from the latest checkpoint (`ray.train.get_checkpoint`);
a new run name starts fresh.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binllm.config import DistributedConfig
from binllm.train.deepspeed_config import Precision, deepspeed_config
from binllm.train.stages import StageAware
from binllm.train.state import copy_into_parameters

log = logging.getLogger(__name__)

STATE_FILE = "binllm_state.pt"  # stage bookkeeping and the loop's client state, written by rank 0
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint layout (every rank writes its shards)
DEEPSPEED_TAG = "state"
DEFAULT_STAGE = "main"


class PlantedFailure(RuntimeError):
    """Raised by `distributed.fail_at_step` to exercise restart and resume."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from deepspeed import DeepSpeedEngine

    return model.module if isinstance(model, DeepSpeedEngine) else model


def _skip_cpu_shm_comm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op (minutes of C++ build) when it
    sets up communication; marking the op unavailable keeps plain torch.distributed (gloo) collectives."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedBackend(StageAware):
    """One Ray Train worker's view of a DeepSpeed run. Build it inside the worker's training function."""

    def __init__(self, dist_cfg: DistributedConfig, *, precision: Precision, micro_batch_size: int = 1,
                 grad_accum: int = 1, zero_stage: int | None = None):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device() if dist_cfg.use_gpu else torch.device("cpu")
        self.dist_cfg, self.precision = dist_cfg, precision
        self.zero_stage = dist_cfg.zero_stage if zero_stage is None else zero_stage
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.engine = None
        self.stage = DEFAULT_STAGE
        self._restore_dir: Path | None = None
        self._restored: dict[str, Any] = {}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            self._restore_dir = Path(tempfile.mkdtemp(prefix="binllm-restore-"))
            checkpoint.to_directory(str(self._restore_dir))
            self._restored = torch.load(self._restore_dir / STATE_FILE, map_location="cpu", weights_only=False)
            log.info("rank %d: found checkpoint of stage %r (finished: %s)", self.rank, self._restored["stage"],
                     sorted(self._restored["finished"]))
            if self._restored["client_state"] is None or self._restored["stage"] in self._restored["finished"]:
                self._drop_restore_dir()  # no engine state to load: the summaries above are all it holds
        self.started_from_checkpoint = checkpoint is not None
        self.finished: dict[str, dict[str, Any]] = dict(self._restored.get("finished", {}))

    # --- stages -------------------------------------------------------------------------------------
    def begin_stage(self, name, *, micro_batch_size, grad_accum):
        self.stage, self.micro_batch_size, self.grad_accum = name, micro_batch_size, grad_accum
        return self.finished.get(name)

    def end_stage(self, name, summary):
        self.finished[name] = summary
        result = summary.get("result", {})
        self._report({"stage": name, "step": result.get("steps", 0), "auc": result.get("best_auc", float("nan"))},
                     with_engine=False, client_state=None)

    # --- training -----------------------------------------------------------------------------------
    def prepare(self, model, optimizer, scheduler):
        import deepspeed

        if self.device.type == "cpu":
            _skip_cpu_shm_comm_op()
        if self.engine is not None:  # a later stage: drop the previous engine's ZeRO hooks first
            self.engine.destroy()
        config = deepspeed_config(
            self._zero_cfg(), micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum,
            world_size=self.world_size, precision=self.precision)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        return self.engine

    def _zero_cfg(self) -> DistributedConfig:
        return replace(self.dist_cfg, zero_stage=self.zero_stage,
                       offload_params=self.dist_cfg.offload_params and self.zero_stage == 3)

    def backward_step(self, loss):
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self._maybe_fail()
        return boundary

    def _maybe_fail(self) -> None:
        step = self.dist_cfg.fail_at_step
        if step and self.rank == 0 and not self.started_from_checkpoint and self.engine.global_steps == step:
            raise PlantedFailure(f"planted failure at optimizer step {step} (distributed.fail_at_step)")

    def gather(self, arrays):
        import torch.distributed as dist

        parts: list[dict[str, np.ndarray] | None] = [None] * self.world_size
        dist.all_gather_object(parts, {k: np.asarray(v) for k, v in arrays.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in arrays}

    # --- parameters ---------------------------------------------------------------------------------
    def trainable_state(self, model):
        """Full fp32 copies of the trainable parameters, assembled from the ZeRO partitions (a collective:
        every rank calls it in the same order)."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in _unwrap(model).named_parameters():
            if not param.requires_grad:
                continue
            full = safe_get_full_fp32_param(param) if self.engine is not None else None
            full = param.detach() if full is None else full
            state[name] = full.detach().to("cpu", torch.float32, copy=True)
            if state[name].numel() == 0:
                raise RuntimeError(f"parameter {name} gathered empty: ZeRO partitions were not assembled")
        return state

    def load_trainable_state(self, model, state):
        """Writes full tensors into the module (re-partitioned under ZeRO-3) and the fp32 master copies."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        def copy(name: str, param: torch.nn.Parameter, value: torch.Tensor) -> None:
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.rank == 0:
                        param.data.copy_(value.to(param.device, param.dtype))
            else:
                param.data.copy_(value.to(param.device, param.dtype))
            if self.engine is not None:
                safe_set_full_fp32_param(param, value.to(param.device, torch.float32))

        copy_into_parameters(_unwrap(model), state, copy=copy)

    # --- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, client_state, metrics):
        self._report({**metrics, "stage": self.stage}, with_engine=True, client_state=client_state)

    def _report(self, metrics: dict[str, Any], *, with_engine: bool, client_state: dict[str, Any] | None) -> None:
        import ray.train

        folder = Path(tempfile.mkdtemp(prefix="binllm-checkpoint-"))
        try:
            if with_engine:
                self.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                            exclude_frozen_parameters=True)
            if self.rank == 0:
                torch.save({"stage": self.stage, "client_state": client_state, "finished": self.finished},
                           folder / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _drop_restore_dir(self) -> None:
        if self._restore_dir is not None:
            shutil.rmtree(self._restore_dir, ignore_errors=True)
            self._restore_dir = None

    def load_checkpoint(self):
        restored = self._restored
        if not restored or restored["stage"] != self.stage or restored["client_state"] is None:
            return None
        if self.stage in self.finished:
            return None
        self.engine.load_checkpoint(str(self._restore_dir / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                    load_module_strict=False, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        self._drop_restore_dir()
        log.info("rank %d: resumed stage %r at step %d", self.rank, self.stage, restored["client_state"]["step"])
        return restored["client_state"]

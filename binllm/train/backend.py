"""Where a training loop runs.

The encoder and LoRA loops are written once against `Backend`. `LocalBackend` runs them in this
process with plain torch; the Ray Train worker backend (binllm.train.distributed) runs the very
same loops under DeepSpeed ZeRO, sharding rows by rank and gathering predictions for validation.
"""
from __future__ import annotations

import abc
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binllm.train.state import copy_into_parameters


class Backend(abc.ABC):
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_indices(self, n: int, *, even: bool) -> np.ndarray:
        """This rank's rows out of n. even=True gives every rank the same count (training steps must
        match across ranks), wrapping around; even=False splits without repeats (validation)."""
        if not even or self.world_size == 1:
            return np.arange(self.rank, n, self.world_size)
        per_rank = -(-n // self.world_size)
        return np.arange(self.rank * per_rank, (self.rank + 1) * per_rank) % max(n, 1)

    @abc.abstractmethod
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> torch.nn.Module:
        raise NotImplementedError

    @abc.abstractmethod
    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward pass; an optimizer (and scheduler) step at each accumulation boundary. True when stepped."""
        raise NotImplementedError

    @abc.abstractmethod
    def gather(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Concatenates each array over all ranks, in rank order; every rank gets the result."""
        raise NotImplementedError

    @abc.abstractmethod
    def trainable_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU copies of the trainable parameters, on every rank."""
        raise NotImplementedError

    @abc.abstractmethod
    def load_trainable_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def save_checkpoint(self, client_state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Saves model, optimizer and scheduler state plus `client_state` as the latest checkpoint."""
        raise NotImplementedError

    @abc.abstractmethod
    def load_checkpoint(self) -> dict[str, Any] | None:
        """Restores the latest checkpoint into the prepared model/optimizer/scheduler; its client_state, or None."""
        raise NotImplementedError


class LocalBackend(Backend):
    """One process, plain torch; checkpoints in a local folder when `checkpoint_dir` is given."""

    def __init__(self, device: str | torch.device = "cpu", grad_accum: int = 1, checkpoint_dir: str | Path | None = None):
        self.device = torch.device(device)
        self.grad_accum = max(1, grad_accum)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self._micro = 0
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None

    def prepare(self, model, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model.to(self.device), optimizer, scheduler
        self._micro = 0
        return self.model

    def backward_step(self, loss):
        (loss / self.grad_accum).backward()
        self._micro += 1
        if self._micro % self.grad_accum:
            return False
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def gather(self, arrays):
        return {k: np.asarray(v) for k, v in arrays.items()}

    def trainable_state(self, model):
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model, state):
        copy_into_parameters(model, state)

    def save_checkpoint(self, client_state, metrics):
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": self.trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "client_state": client_state,
            "metrics": metrics,
        }
        fd, tmp = tempfile.mkstemp(dir=self.checkpoint_dir, suffix=".tmp")
        os.close(fd)
        torch.save(payload, tmp)
        os.replace(tmp, self.checkpoint_dir / "latest.pt")

    def load_checkpoint(self):
        path = self.checkpoint_dir / "latest.pt" if self.checkpoint_dir else None
        if path is None or not path.exists():
            return None
        payload = torch.load(path, map_location="cpu", weights_only=False)
        self.load_trainable_state(self.model, payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        return payload["client_state"]

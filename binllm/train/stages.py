"""Multi-stage runs (two-step LoRA tuning) on backends whose checkpoints outlive the process.

A Ray Train worker that restarts after a failure, or a re-submitted job with the same run name, finds the
latest checkpoint of the run. For a two-stage run it must know which stage that checkpoint belongs to and
which stages had already finished, so that it neither repeats a finished stage nor restores stage-2 state
into stage 1. Backends that keep such checkpoints implement `StageAware`; plain backends need nothing.
"""
from __future__ import annotations

import abc
from typing import Any

from binllm.train.backend import Backend


class StageAware(Backend):
    @abc.abstractmethod
    def begin_stage(self, name: str, *, micro_batch_size: int, grad_accum: int) -> dict[str, Any] | None:
        """Enters stage `name` (its checkpoints are tagged with it; the next `prepare` uses these batch
        settings). Returns the summary passed to `end_stage` when a resumed run had already finished it."""
        raise NotImplementedError

    @abc.abstractmethod
    def end_stage(self, name: str, summary: dict[str, Any]) -> None:
        """Records that stage `name` finished, with `summary`, in this and every later checkpoint."""
        raise NotImplementedError

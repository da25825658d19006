"""The scoring actor: one LLM + LoRA adapter per actor, answer logits for batches of prompts."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from binllm import sources, storage
from binllm.config import LLMConfig, ScoreConfig, StorageConfig
from binllm.llm import AnswerTokens, answer_tokens, autocast_dtype, load_adapter, score_prompts
from binllm.metrics import sigmoid

logger = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("score", pa.float32()),
    ("logit", pa.float32()),
    ("fallback", pa.bool_()),
    ("model_version", pa.string()),
    ("run_id", pa.string()),
])


@dataclass(frozen=True)
class ScorerSpec:
    """What a scoring actor needs, and nothing more: Ray pickles it to every actor."""

    llm: LLMConfig  # the base model: location, dtype, trust_remote_code, answer tokens
    storage: StorageConfig  # reaches the model and the adapter (an S3Settings carries the driver's credentials)
    adapter: str
    model_version: str
    run_id: str
    dtype: str  # score.dtype; empty: llm.dtype
    autocast: str  # score.autocast
    shared_prefix: bool  # score.shared_prefix
    max_batch_tokens: int  # score.max_batch_tokens
    cpus: float  # score.cpus_per_actor: torch threads of an actor that scores on CPU
    gpus: float  # score.gpus_per_actor: > 0 scores on CUDA when the actor has it
    fail_at_batch: int  # score.fail_at_batch (fault injection; 0: never)

    @classmethod
    def for_score(cls, score: ScoreConfig, llm: LLMConfig, storage_cfg: StorageConfig, *, adapter: str,
                  model_version: str, run_id: str) -> ScorerSpec:
        """The spec of the `score` section's actors."""
        return cls(llm=llm, storage=storage_cfg, adapter=adapter, model_version=model_version, run_id=run_id,
                   dtype=score.dtype, autocast=score.autocast, shared_prefix=score.shared_prefix,
                   max_batch_tokens=score.max_batch_tokens, cpus=score.cpus_per_actor, gpus=score.gpus_per_actor,
                   fail_at_batch=score.fail_at_batch)


def load_scoring_model(llm: LLMConfig, storage_cfg: StorageConfig, adapter: str, *, dtype: str = "",
                       device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """Base LLM (local, s3:// or demo, copied once per node) in `dtype` (empty: llm.dtype) with the LoRA adapter
    merged in."""
    model, tokenizer = sources.load_base_model(llm, storage_cfg, dtype=dtype, device=device)
    model = load_adapter(model, storage.local_copy(adapter, storage_cfg=storage_cfg)).merge_and_unload()
    model.eval()
    return model, tokenizer


class Scorer:
    """Ray Data callable class: (user_id, item_id, prefix, suffix, fallback) -> the scores schema."""

    def __init__(self, spec: ScorerSpec):
        use_gpu = spec.gpus > 0 and torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(max(1, int(round(spec.cpus))))
        self.spec = spec
        device = "cuda" if use_gpu else "cpu"
        self.model, self.tokenizer = load_scoring_model(spec.llm, spec.storage, spec.adapter, dtype=spec.dtype,
                                                        device=device)
        self.autocast = autocast_dtype(spec.autocast, device)
        self.answer: AnswerTokens | None = None
        self.batches = 0

    def _planted_exit(self) -> None:
        """score.fail_at_batch: this actor's process dies at its Nth batch, once per run and node (a marker
        file remembers it), as a crashed or preempted scorer would."""
        self.batches += 1
        if self.batches != self.spec.fail_at_batch:
            return
        marker = Path(tempfile.gettempdir()) / "binllm-fault-hooks" / f"scorer-{self.spec.run_id}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return
        logger.warning("planted failure: scoring actor exits at batch %d (score.fail_at_batch)", self.batches)
        os._exit(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.spec.fail_at_batch:
            self._planted_exit()
        n = batch.num_rows
        prefixes = batch.column("prefix").to_pylist()
        suffixes = batch.column("suffix").to_pylist()
        if self.answer is None and n:
            llm = self.spec.llm
            self.answer = answer_tokens(self.tokenizer, prefixes[0] + suffixes[0], llm.answer, llm.negative_answer)
        logits = (
            score_prompts(self.model, self.tokenizer, prefixes, suffixes, answer_id=self.answer,
                          shared_prefix=self.spec.shared_prefix, max_batch_tokens=self.spec.max_batch_tokens,
                          autocast=self.autocast)
            if n else np.zeros(0, np.float32)
        )
        return pa.Table.from_arrays([
            batch.column("user_id"),
            batch.column("item_id"),
            pa.array(sigmoid(logits), pa.float32()),
            pa.array(logits, pa.float32()),
            batch.column("fallback"),
            pa.array([self.spec.model_version] * n, pa.string()),
            pa.array([self.spec.run_id] * n, pa.string()),
        ], schema=SCORE_SCHEMA)

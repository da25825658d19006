"""Sizing training micro-batches from free GPU memory (`micro_batch_tokens: -1`)."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from binllm.llm import AnswerTokens, yes_logits
from binllm.llm.forward import unwrap_causal_lm
from binllm.train.backend import Backend

log = logging.getLogger(__name__)

AUTO_BUDGET_SHARE = 0.6  # share of free GPU memory that an auto-sized micro-batch may take
AUTO_BUDGET_MAX = 1 << 18


def fit_micro_batch_tokens(model: torch.nn.Module, answer: AnswerTokens, lengths: np.ndarray, backend: Backend,
                           probe_tokens: int = 8192) -> int:
    """A token budget for training micro-batches sized from free GPU memory: one forward + backward on
    probe_tokens tokens of the rows' median length measures the memory a token takes; the budget is
    AUTO_BUDGET_SHARE of the free memory at that rate (the smallest over ranks). Off CUDA: 0 (rows)."""
    device = backend.device
    if device.type != "cuda":
        return 0
    width = int(np.median(lengths))
    rows = max(1, probe_tokens // width)
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model.train()
    vocab = unwrap_causal_lm(model).config.vocab_size
    input_ids = torch.randint(min(10, vocab - 1), vocab, (rows, width), device=device)
    logits = yes_logits(model, input_ids, torch.ones_like(input_ids), answer)
    F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).backward()
    per_token = (torch.cuda.max_memory_allocated(device) - before) / (rows * width)
    model.zero_grad(set_to_none=True)
    budget = int(min(AUTO_BUDGET_MAX, AUTO_BUDGET_SHARE * free / max(per_token, 1.0)))
    budget = int(backend.gather({"budget": np.asarray([budget])})["budget"].min())
    if backend.is_main:
        log.info("micro-batch budget %d tokens (%.0f KiB per token, %.1f GiB free)", budget, per_token / 1024,
                 free / 2**30)
    return max(budget, width)

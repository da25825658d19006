"""Batches of prompts in, the answer token's logit at each prompt's last position out."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel


def collate_prompts(token_id_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), both int64 [B, max_len]."""
    if not token_id_lists:
        raise ValueError("collate_prompts needs at least one token id list")
    lengths = np.fromiter((len(ids) for ids in token_id_lists), dtype=np.int64, count=len(token_id_lists))
    if (lengths == 0).any():
        raise ValueError(f"prompt {int(np.argmin(lengths))} has no tokens")
    width = int(lengths.max())
    input_ids = np.full((len(token_id_lists), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_id_lists), width), dtype=np.int64)
    for row, ids in enumerate(token_id_lists):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding shifts nothing)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def yes_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_id: int
) -> torch.Tensor:
    """Differentiable answer-token logit at the last position of each left-padded prompt: float32 [B].

    Goes through the model's own forward with `logits_to_keep=1`, so the vocabulary projection covers
    one position per row, and wrappers (PEFT, DDP, DeepSpeed engines) see a normal forward call.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("yes_logits expects left-padded batches: every row's last position must be a real token")
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=1,
    )
    return out.logits[:, -1, answer_id].float()


def unwrap_causal_lm(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM inside a PEFT wrapper (LoRA layers stay injected and active)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise TypeError(f"expected a Hugging Face causal LM (or a PEFT model around one), got {type(model).__name__}")
    return model


class AnswerHead:
    """The answer token's row of the LM head: hidden states [N, H] -> answer logits float32 [N].

    Projecting onto one vocabulary row instead of the whole vocabulary is what makes last-position
    scoring cheap; final-logit soft-capping (Gemma-2 style configs) is applied when configured.
    """

    def __init__(self, causal_lm: PreTrainedModel, answer_id: int):
        head = causal_lm.get_output_embeddings()
        vocab = head.weight.shape[0]
        if not 0 <= answer_id < vocab:
            raise ValueError(f"answer_id {answer_id} is outside the model's vocabulary of {vocab} tokens")
        self.weight = head.weight[answer_id]
        self.bias = head.bias[answer_id] if getattr(head, "bias", None) is not None else None
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.to(self.weight.dtype) @ self.weight
        if self.bias is not None:
            logits = logits + self.bias
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

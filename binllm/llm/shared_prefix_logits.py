"""The differentiable click score of prompts that share prefixes, each distinct prefix run once (training).

Two calls of the model's own forward, so PEFT and engine wrappers see normal forwards:
1. the distinct prefixes, right-padded, keeping their keys and values (binllm.llm.prefix_attention's
   prefix pass);
2. one left-padded row per suffix, whose cache is its prefix's keys and values (`PrefixLayer`); the
   scorers' block mask shows each suffix token its prefix's real tokens and the earlier tokens of its own
   suffix, and its position ids continue after the prefix, so it sees exactly what it sees in its full
   prompt. The score is read at the last column as in `yes_logits` (same AnswerHead, same hooks).
Autograd runs through the cached keys and values, so the prefix's LoRA gets the gradient of every suffix
that read it: loss and gradients equal those of `yes_logits` on the full prompts, up to float rounding.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from binllm.llm.forward import (
    collate_prompts,
    last_position_scores,
    positions_from_mask,
    training_attention_kernels,
    unwrap_causal_lm,
)
from binllm.llm.prefix_attention import PrefixLayer, attention_mask_format, block_mask, run_prefixes, to_model_mask
from binllm.llm.tokens import AnswerTokens, EncodedPrompts


def shared_prefix_yes_logits(
    model: nn.Module, encoded: EncodedPrompts, answer_id: int | AnswerTokens, pad_id: int
) -> torch.Tensor:
    """Click scores float32 [N] of `encoded`'s prompts in pair order, each distinct prefix computed once:
    `yes_logits` of prompt i = prefix_ids[pair_prefix[i]] + suffix_ids[i], differentiable."""
    if len(encoded) == 0:
        raise ValueError("shared_prefix_yes_logits needs at least one prompt")
    causal_lm = unwrap_causal_lm(model)
    implementation = attention_mask_format(causal_lm)
    parameter = next(causal_lm.parameters())
    device, dtype = parameter.device, parameter.dtype
    with training_attention_kernels(device):
        prefix_kv = run_prefixes(model, encoded.prefix_ids, pad_id, device, logits_to_keep=1)
    input_ids, mask = collate_prompts(encoded.suffix_ids, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    slots = torch.from_numpy(encoded.pair_prefix).to(device)
    prefix_lengths = torch.tensor([len(ids) for ids in encoded.prefix_ids], device=device)[slots]
    allowed = block_mask(mask - 1, prefix_lengths, prefix_kv[0][0].shape[-2])  # segment 0: suffix, -1: padding
    return last_position_scores(
        model,
        answer_id,
        input_ids,
        attention_mask=to_model_mask(allowed, implementation, dtype),
        position_ids=positions_from_mask(mask) + prefix_lengths[:, None],
        past_key_values=Cache(layers=[PrefixLayer(keys, values, slots) for keys, values in prefix_kv]),
        use_cache=True,
    )

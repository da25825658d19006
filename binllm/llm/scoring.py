"""Batched inference: the answer-token logit of every (prefix, suffix) prompt, last position only."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from binllm.llm.batching import length_buckets
from binllm.llm.forward import AnswerHead, collate_prompts, positions_from_mask, unwrap_causal_lm
from binllm.llm.shared_prefix import score_shared_prefix
from binllm.llm.tokens import AnswerTokens, EncodedPrompts, encode_prompt_parts

DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_ROW_TOKENS = 256


def score_full_prompts(
    decoder: nn.Module, head: AnswerHead, encoded: EncodedPrompts, *, pad_id: int, max_batch_tokens: int
) -> np.ndarray:
    """One left-padded sequence per pair, batches bucketed by length; answer logits float32 [N] in pair order."""
    device = next(decoder.parameters()).device
    sequences = encoded.sequences()
    lengths = np.asarray([len(ids) for ids in sequences], dtype=np.int64)
    scores = np.empty(len(sequences), dtype=np.float32)
    for batch in tqdm(length_buckets(lengths, max_batch_tokens), desc="scoring", unit="batch", leave=False,
                      disable=None):
        input_ids, attention_mask = collate_prompts([sequences[i] for i in batch.tolist()], pad_id)
        hidden = decoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=positions_from_mask(attention_mask).to(device),
            use_cache=False,
        ).last_hidden_state
        scores[batch] = head(hidden[:, -1]).cpu().numpy()
    return scores


@contextlib.contextmanager
def _inference(model: nn.Module, autocast: torch.dtype | None = None) -> Iterator[None]:
    """Eval mode (no LoRA dropout) and no autograd. Without `autocast` the model's dtype is the compute dtype
    (load it in bf16 for speed, float32 for a reference); with it, float32 weights and residual stream and
    matmuls in `autocast` (as bf16-autocast tuning computes; the answer head stays float32)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device.type
    try:
        with torch.inference_mode(), torch.autocast(device, dtype=autocast or torch.bfloat16,
                                                    enabled=autocast is not None):
            yield
    finally:
        model.train(was_training)


def score_encoded(
    model: nn.Module,
    encoded: EncodedPrompts,
    *,
    answer_id: int | AnswerTokens,
    pad_id: int,
    shared_prefix: bool = True,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_row_tokens: int = DEFAULT_MAX_ROW_TOKENS,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """Answer logits float32 [N] for already-encoded prompts (see `score_prompts`)."""
    if max_batch_tokens < 1 or max_row_tokens < 1:
        raise ValueError(f"max_batch_tokens and max_row_tokens must be >= 1, got {max_batch_tokens}, {max_row_tokens}")
    if len(encoded) == 0:
        return np.empty(0, dtype=np.float32)
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder()
    head = AnswerHead.of_model(causal_lm, answer_id)
    with _inference(model, autocast):
        if shared_prefix:
            return score_shared_prefix(
                decoder, head, encoded, pad_id=pad_id, max_batch_tokens=max_batch_tokens, max_row_tokens=max_row_tokens
            )
        return score_full_prompts(decoder, head, encoded, pad_id=pad_id, max_batch_tokens=max_batch_tokens)


def score_prompts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prefixes: Sequence[str],
    suffixes: Sequence[str],
    *,
    answer_id: int | AnswerTokens,
    shared_prefix: bool = True,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_row_tokens: int = DEFAULT_MAX_ROW_TOKENS,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """The answer-token logit of each prompt prefix[i] + suffix[i]: float32 [N], in input order.

    shared_prefix=True (default) runs each distinct prefix once and packs that user's candidates into rows
    of at most `max_row_tokens` suffix tokens that reuse it; False runs one full sequence per pair.
    `max_batch_tokens` caps the tokens of one forward pass (rows x longest row). `autocast` (torch.bfloat16):
    matmuls in bf16 over float32 weights (see `_inference`).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with binllm.llm.load_causal_lm or set one")
    encoded = encode_prompt_parts(tokenizer, prefixes, suffixes)
    return score_encoded(
        model,
        encoded,
        answer_id=answer_id,
        pad_id=tokenizer.pad_token_id,
        shared_prefix=shared_prefix,
        max_batch_tokens=max_batch_tokens,
        max_row_tokens=max_row_tokens,
        autocast=autocast,
    )

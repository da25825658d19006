"""Shared-prefix scoring: each user's prefix runs through the model once; its candidates' suffixes
then attend to that prefix's keys and values.

Two forwards per group of users:
1. prefixes, right-padded, plain causal attention, keeping the KV cache;
2. packed rows `[s1, s2, ..., sk]` (k candidates of one user side by side), whose cache is that
   user's prefix KV (one copy per row, never one per candidate). A 4D block mask lets suffix j see
   the user's real prefix tokens and itself causally, not the other suffixes; its position ids
   restart at len(prefix), so every candidate sees exactly the positions of its full prompt.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from binllm.llm.batching import PackedRow, plan_shared_prefix
from binllm.llm.forward import AnswerHead
from binllm.llm.prefix_attention import PrefixLayer, attention_mask_format, block_mask, run_prefixes, to_model_mask
from binllm.llm.tokens import EncodedPrompts

def _layout_rows(
    rows: list[PackedRow], suffix_ids: Sequence[Sequence[int]], prefix_lengths: np.ndarray, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, position_ids, segment ids (-1 = padding) [R, T]; and per pair: pair index, row, last column."""
    widths = [sum(len(suffix_ids[p]) for p in row.pairs.tolist()) for row in rows]
    shape = (len(rows), max(widths))
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segments = np.full(shape, -1, dtype=np.int64)
    pairs, end_rows, end_cols = [], [], []
    for r, row in enumerate(rows):
        start_position = int(prefix_lengths[r])
        col = 0
        for j, pair in enumerate(row.pairs.tolist()):
            ids = suffix_ids[pair]
            end = col + len(ids)
            input_ids[r, col:end] = ids
            position_ids[r, col:end] = np.arange(start_position, start_position + len(ids))
            segments[r, col:end] = j
            pairs.append(pair)
            end_rows.append(r)
            end_cols.append(end - 1)
            col = end
    return input_ids, position_ids, segments, np.asarray(pairs), np.asarray(end_rows), np.asarray(end_cols)


def score_shared_prefix(
    decoder: nn.Module,
    head: AnswerHead,
    encoded: EncodedPrompts,
    *,
    pad_id: int,
    max_batch_tokens: int,
    max_row_tokens: int,
) -> np.ndarray:
    """Answer logits float32 [N] in pair order; see the module docstring for the method."""
    implementation = attention_mask_format(decoder)
    device = next(decoder.parameters()).device
    dtype = next(decoder.parameters()).dtype
    prefix_lengths = np.asarray([len(ids) for ids in encoded.prefix_ids], dtype=np.int64)
    suffix_lengths = np.asarray([len(ids) for ids in encoded.suffix_ids], dtype=np.int64)
    scores = np.empty(len(encoded), dtype=np.float32)
    groups = plan_shared_prefix(
        prefix_lengths,
        suffix_lengths,
        encoded.pair_prefix,
        max_batch_tokens=max_batch_tokens,
        max_row_tokens=max_row_tokens,
    )
    for group in tqdm(groups, desc="scoring", unit="prefix group", leave=False, disable=None):
        prefix_kv = run_prefixes(decoder, [encoded.prefix_ids[u] for u in group.users.tolist()], pad_id, device)
        slot_of_user = {user: g for g, user in enumerate(group.users.tolist())}
        prefix_width = prefix_kv[0][0].shape[-2]
        for rows in group.row_batches:
            row_users = np.asarray([row.user for row in rows])
            input_ids, position_ids, segments, pairs, end_rows, end_cols = _layout_rows(
                rows, encoded.suffix_ids, prefix_lengths[row_users], pad_id
            )
            slots = torch.tensor([slot_of_user[u] for u in row_users.tolist()], device=device)
            cache = Cache(layers=[PrefixLayer(keys, values, slots) for keys, values in prefix_kv])
            allowed = block_mask(
                torch.from_numpy(segments).to(device),
                torch.from_numpy(prefix_lengths[row_users]).to(device),
                prefix_width,
            )
            hidden = decoder(
                input_ids=torch.from_numpy(input_ids).to(device),
                attention_mask=to_model_mask(allowed, implementation, dtype),
                position_ids=torch.from_numpy(position_ids).to(device),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            last = hidden[torch.from_numpy(end_rows).to(device), torch.from_numpy(end_cols).to(device)]
            scores[pairs] = head(last).cpu().numpy()
    return scores

"""The parts both shared-prefix forwards use (scoring: binllm.llm.shared_prefix; training:
binllm.llm.shared_prefix_logits): the prefix pass that keeps each prefix's keys and values, a cache layer
that serves them to the suffix rows, and the block mask that lets a suffix see its own prefix only."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

MASK_FORMATS = ("sdpa", "eager")


def attention_mask_format(decoder: nn.Module) -> str:
    implementation = getattr(decoder.config, "_attn_implementation", None)
    if implementation not in MASK_FORMATS:
        raise ValueError(
            f"shared-prefix scoring and training need a custom 4D attention mask, which works with "
            f"attn_implementation 'sdpa' or 'eager'; this model uses {implementation!r} (load it with "
            "attn_implementation='sdpa', or turn shared_prefix off)"
        )
    return implementation


def to_model_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [R, 1, Q, K] (True = may attend) in the form the attention implementation expects."""
    if implementation == "sdpa":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


class PrefixLayer(DynamicLayer):
    """One layer's prefix keys/values [G, kv_heads, P, head_dim] for a batch of packed rows: row r sees
    prefix `slots[r]` followed by its own states. Nothing is appended or kept, so the per-row copy made
    for one layer is freed when that layer is done."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.slots = keys, values, slots
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.keys.index_select(0, self.slots), self.values.index_select(0, self.slots)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def run_prefixes(
    decoder: nn.Module, prefixes: Sequence[Sequence[int]], pad_id: int, device: torch.device, **forward_kwargs
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) [G, kv_heads, P_max, head_dim] of right-padded prefixes. `decoder` may also
    be a whole causal LM (training runs its own forward; forward_kwargs such as logits_to_keep go to it).

    Right padding keeps each real token's causal context free of padding, so no mask is needed.
    """
    width = max(len(ids) for ids in prefixes)
    input_ids = np.full((len(prefixes), width), pad_id, dtype=np.int64)
    for row, ids in enumerate(prefixes):
        input_ids[row, : len(ids)] = ids
    out = decoder(input_ids=torch.from_numpy(input_ids).to(device), use_cache=True, **forward_kwargs)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def block_mask(segments: torch.Tensor, prefix_lengths: torch.Tensor, prefix_width: int) -> torch.Tensor:
    """[R, 1, T, P_max + T]: a suffix token sees its user's real prefix tokens, and earlier tokens of its own
    suffix. Padding positions (segment -1) see only padding, so their outputs stay finite and unused."""
    width = segments.shape[1]
    sees_prefix = torch.arange(prefix_width, device=segments.device) < prefix_lengths[:, None]  # [R, P]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    sees_suffix = (segments[:, :, None] == segments[:, None, :]) & causal  # [R, T, T]
    allowed = torch.cat([sees_prefix[:, None, :].expand(-1, width, -1), sees_suffix], dim=-1)
    return allowed[:, None]

"""Frozen-trunk caching: with LoRA on the top decoder layers only, the layers below the lowest adapted one
never change during tuning, so their output for a prompt is the same in every epoch and validation.

`TrunkCache` runs that frozen trunk once per prompt (no autograd, the tuning forward's autocast), keeps each
prompt's hidden states on the host, and `top_scores` runs only the adapted layers on them, through the
model's own forward (so PEFT and engine wrappers see a normal call) with the score read by the same
AnswerHead hooks as `yes_logits`. In float32 the scores equal `yes_logits` on the full prompts up to float
rounding (tests); a step then costs the adapted layers' forward and backward only.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from binllm.llm.forward import collate_prompts, last_position_scores, positions_from_mask, unwrap_causal_lm
from binllm.llm.tokens import AnswerTokens


def first_adapted_layer(model: nn.Module) -> int:
    """Index of the lowest decoder layer with trainable parameters; the trunk is the layers below it.
    Refuses a model with trainable parameters outside the decoder layers (embeddings, head): the trunk
    would not be frozen."""
    causal_lm = unwrap_causal_lm(model)
    layers = causal_lm.get_decoder().layers
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    outside = [name for name, p in causal_lm.named_parameters() if p.requires_grad and id(p) not in in_layers]
    if outside:
        raise ValueError(f"a frozen trunk needs every trainable parameter inside the decoder layers; {outside[:3]} "
                         "are not")
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    raise ValueError("the model has no trainable decoder layer: nothing to tune on a frozen trunk")


@contextlib.contextmanager
def decoder_layers(model: nn.Module, start: int, stop: int | None = None) -> Iterator[None]:
    """The decoder runs only its layers [start:stop] inside the block (the model's own forward otherwise)."""
    decoder = unwrap_causal_lm(model).get_decoder()
    every = decoder.layers
    decoder.layers = every[start:stop]
    try:
        yield
    finally:
        decoder.layers = every


def trunk_states(model: nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, split: int) -> list[torch.Tensor]:
    """The hidden state entering decoder layer `split`, per prompt: [len_i, H] each, no padding, on the
    model's device (inference, the caller's autocast applies)."""
    decoder = unwrap_causal_lm(model).get_decoder()
    device = next(decoder.parameters()).device
    input_ids, mask = collate_prompts(token_ids, pad_id)
    captured: list[torch.Tensor] = []
    hook = decoder.norm.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    was_training = decoder.training
    decoder.eval()  # the scorers' mode: no dropout in the frozen layers
    try:
        with torch.no_grad(), decoder_layers(model, 0, split):
            decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions_from_mask(mask).to(device), use_cache=False)
    finally:
        hook.remove()
        decoder.train(was_training)
    (states,) = captured
    width = states.shape[1]
    return [states[row, width - len(ids):] for row, ids in enumerate(token_ids)]


def collate_states(states: Sequence[torch.Tensor], dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad per-prompt hidden states into ([B, T, H] in `dtype`, attention mask int64 [B, T]); padding
    positions are zeros, which stay finite through the layers and are masked out."""
    lengths = [len(s) for s in states]
    width, hidden = max(lengths), states[0].shape[-1]
    batch = torch.zeros((len(states), width, hidden), dtype=dtype)
    mask = torch.zeros((len(states), width), dtype=torch.int64)
    for row, (s, n) in enumerate(zip(states, lengths)):
        batch[row, width - n:] = s
        mask[row, width - n:] = 1
    return batch.to(device), mask.to(device)


def top_scores(model: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor, answer_id: int | AnswerTokens,
               split: int) -> torch.Tensor:
    """Click scores float32 [B] of left-padded trunk states: the decoder layers from `split` up, the final
    norm and the AnswerHead, differentiable in the adapted layers."""
    with decoder_layers(model, split):
        return last_position_scores(model, answer_id, inputs_embeds=states, attention_mask=attention_mask,
                                    position_ids=positions_from_mask(attention_mask), use_cache=False)


class TrunkCache:
    """Each prompt's trunk output, computed the first time the prompt is needed, kept on the host in
    `store_dtype` (bf16 halves the memory; the residual stream is upcast to the model's dtype on use)."""

    def __init__(self, model: nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int,
                 store_dtype: torch.dtype = torch.float32):
        self.model, self.token_ids, self.pad_id, self.store_dtype = model, token_ids, pad_id, store_dtype
        self.split = first_adapted_layer(model)
        self.states: list[torch.Tensor | None] = [None] * len(token_ids)
        self.computed_tokens = 0  # tokens run through the trunk (each prompt once)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states if s is not None)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(left-padded states, attention mask) of `rows` on the model's device, computing missing rows."""
        missing = [r for r in rows.tolist() if self.states[r] is None]
        if missing:
            computed = trunk_states(self.model, [self.token_ids[r] for r in missing], self.pad_id, self.split)
            for r, s in zip(missing, computed):
                self.states[r] = s.detach().to("cpu", self.store_dtype, copy=True)  # not a view of the batch
                self.computed_tokens += len(s)
        parameter = next(unwrap_causal_lm(self.model).parameters())
        return collate_states([self.states[r] for r in rows.tolist()], parameter.dtype, parameter.device)

    def scores(self, model: nn.Module, rows: np.ndarray, answer_id: int | AnswerTokens) -> torch.Tensor:
        """Click scores of `rows` through `model` (the prepared model whose top layers tune)."""
        states, mask = self.batch(rows)
        return top_scores(model, states, mask, answer_id, self.split)

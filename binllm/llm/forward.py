"""Batches of prompts in, the answer token's logit at each prompt's last position out."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from binllm.llm.tokens import AnswerTokens, as_answer_tokens


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


def training_attention_kernels(device: torch.device):
    """On CUDA, SDPA without the cuDNN backend. Its backward returns NaN query gradients when a mask is
    given, the sequence length is 64 mod 128 and a query row is fully masked (left padding), on H100/H200
    with torch 2.11 (pytorch/pytorch#196678): seen here as LoRA tuning turning NaN mid-epoch. The memory-
    efficient and flash kernels are clean, and at these lengths no slower."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def yes_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_id: int | AnswerTokens,
) -> torch.Tensor:
    """Differentiable click score at the last position of each left-padded prompt: float32 [B].

    The score is `AnswerHead`'s: the "Yes" logit, minus the "No" logit when `answer_id` names one, computed
    in float32 from the final hidden state. It goes through the model's own forward with `logits_to_keep=1`,
    so wrappers (PEFT, DDP, DeepSpeed engines) see a normal forward call. Forward pre-hooks on the output
    embeddings take their input (the final hidden state) and the answer rows of their weight, so the score
    is the scorers' float32 math, not the model-dtype vocabulary logits (bf16 rounds a logit of 14 to steps
    of 0.06).
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("yes_logits expects left-padded batches: every row's last position must be a real token")
    return last_position_scores(model, answer_id, input_ids, attention_mask=attention_mask,
                                position_ids=positions_from_mask(attention_mask), use_cache=False)


def last_position_scores(model: nn.Module, answer_id: int | AnswerTokens, input_ids: torch.Tensor | None = None,
                         **forward_kwargs) -> torch.Tensor:
    """`model(input_ids, **forward_kwargs, logits_to_keep=1)` and the AnswerHead score of each row's last
    position: float32 [B], differentiable (see yes_logits). Each row's last column must be its last token.
    input_ids may be None when forward_kwargs give inputs_embeds (the frozen trunk's hidden states)."""
    causal_lm = unwrap_causal_lm(model)
    head_module = causal_lm.get_output_embeddings()
    answer = as_answer_tokens(answer_id)
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    hidden: list[torch.Tensor] = []
    heads: list[AnswerHead] = []

    def take_hidden(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        hidden.append(inputs[0][:, -1])

    def take_head(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        heads.append(AnswerHead(module, answer, softcap))

    # The hidden state is taken before any wrapper's pre-hook (ZeRO-3 wraps the module's inputs to run
    # its own backward bookkeeping, which must not fire for a module whose output the loss ignores);
    # the answer rows after them (ZeRO-3 has gathered the weight by then).
    handles = [head_module.register_forward_pre_hook(take_hidden, prepend=True),
               head_module.register_forward_pre_hook(take_head)]
    try:
        device = (input_ids if input_ids is not None else forward_kwargs["inputs_embeds"]).device
        with training_attention_kernels(device):
            model(input_ids=input_ids, **forward_kwargs, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    if len(hidden) != 1 or len(heads) != 1:
        raise RuntimeError(f"the output embeddings ran {len(hidden)} times in one forward; expected once")
    return heads[0](hidden[0])


def unwrap_causal_lm(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM inside a PEFT wrapper (LoRA layers stay injected and active)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise TypeError(f"expected a Hugging Face causal LM (or a PEFT model around one), got {type(model).__name__}")
    return model


class AnswerHead:
    """Hidden states [N, H] -> click scores float32 [N]: the answer token's logit ("Yes"), minus the negative
    token's ("No") when one is given, i.e. the log-odds of a softmax over the two answers.

    Only the answer rows of the LM head are used, in float32 (final-logit soft-capping, Gemma-2 style, is
    applied to each logit first), which is what makes last-position scoring cheap and bf16-safe.
    """

    def __init__(self, head: nn.Module, answer: AnswerTokens, softcap: float | None = None):
        rows = list(answer.ids)
        self.weight = head.weight[rows].float()  # [A, H], A = 1 or 2
        bias = getattr(head, "bias", None)
        self.bias = bias[rows].float() if bias is not None else None
        self.softcap = softcap

    @classmethod
    def of_model(cls, causal_lm: PreTrainedModel, answer_id: int | AnswerTokens) -> AnswerHead:
        """The head of a causal LM's output embeddings, with the answer tokens checked against its vocabulary."""
        head = causal_lm.get_output_embeddings()
        answer = as_answer_tokens(answer_id)
        vocab = head.weight.shape[0]
        for token in answer.ids:
            if not 0 <= token < vocab:
                raise ValueError(f"answer token {token} is outside the model's vocabulary of {vocab} tokens")
        return cls(head, answer, getattr(causal_lm.config, "final_logit_softcapping", None))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # float32 under a mixed-precision forward too
            logits = hidden.float() @ self.weight.T
            if self.bias is not None:
                logits = logits + self.bias
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]

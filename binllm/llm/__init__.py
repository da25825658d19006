"""The LLM layer: loading, prompt tokens, LoRA, the differentiable answer logit, and bulk scoring."""
from binllm.llm.forward import collate_prompts, yes_logits
from binllm.llm.loading import autocast_dtype, load_causal_lm, load_tokenizer, native_bf16
from binllm.llm.lora import apply_lora, load_adapter, save_adapter
from binllm.llm.scoring import score_encoded, score_prompts
from binllm.llm.tiny import build_tiny_llm
from binllm.llm.tokens import (
    AnswerTokens,
    EncodedPrompts,
    answer_token_id,
    answer_tokens,
    as_answer_tokens,
    encode_prompt_parts,
    encode_prompts,
    prompt_token_counts,
)

__all__ = [
    "AnswerTokens",
    "EncodedPrompts",
    "answer_token_id",
    "answer_tokens",
    "as_answer_tokens",
    "autocast_dtype",
    "apply_lora",
    "build_tiny_llm",
    "collate_prompts",
    "encode_prompt_parts",
    "encode_prompts",
    "load_adapter",
    "load_causal_lm",
    "load_tokenizer",
    "native_bf16",
    "prompt_token_counts",
    "save_adapter",
    "score_encoded",
    "score_prompts",
    "yes_logits",
]

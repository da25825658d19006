"""The canonical token sequence of a prompt, and the answer token that follows it.

A prompt arrives as two strings: `prefix` (depends only on the user) and `suffix` (the candidate item
and the question). Its canonical tokens are `encode(prefix, special tokens) + encode(suffix, none)`;
training and both scoring paths use exactly these tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts encoded once per distinct prefix: pair i is `prefix_ids[pair_prefix[i]] + suffix_ids[i]`."""

    prefix_ids: list[list[int]]
    suffix_ids: list[list[int]]
    pair_prefix: np.ndarray  # int64, one entry per pair

    def __len__(self) -> int:
        return len(self.suffix_ids)

    def sequences(self) -> list[list[int]]:
        return [self.prefix_ids[p] + s for p, s in zip(self.pair_prefix.tolist(), self.suffix_ids)]


def _check_pairs(prefixes: Sequence[str], suffixes: Sequence[str]) -> None:
    if len(prefixes) != len(suffixes):
        raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; expected one of each per prompt")


def encode_prompt_parts(
    tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str], suffixes: Sequence[str]
) -> EncodedPrompts:
    """Tokenise each distinct prefix once and every suffix, in two batched tokenizer calls."""
    _check_pairs(prefixes, suffixes)
    index: dict[str, int] = {}
    pair_prefix = np.fromiter((index.setdefault(p, len(index)) for p in prefixes), dtype=np.int64, count=len(prefixes))
    distinct = list(index)
    prefix_ids = tokenizer(distinct, add_special_tokens=True)["input_ids"] if distinct else []
    suffix_ids = tokenizer(list(suffixes), add_special_tokens=False)["input_ids"] if len(suffixes) else []
    for i, ids in enumerate(suffix_ids):
        if not ids:
            raise ValueError(f"suffix {i} ({suffixes[i]!r}) encodes to no tokens; a prompt must end with a suffix")
    for i, ids in enumerate(prefix_ids):
        if not ids:
            raise ValueError(f"prefix {distinct[i]!r} encodes to no tokens")
    return EncodedPrompts(prefix_ids=prefix_ids, suffix_ids=suffix_ids, pair_prefix=pair_prefix)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str], suffixes: Sequence[str]
) -> list[list[int]]:
    """The canonical token ids of each prompt (prefix + suffix), in input order."""
    return encode_prompt_parts(tokenizer, prefixes, suffixes).sequences()


def prompt_token_counts(
    tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str], suffixes: Sequence[str]
) -> np.ndarray:
    """The length of each prompt's canonical tokens (`encode_prompts`), int64 in input order."""
    encoded = encode_prompt_parts(tokenizer, prefixes, suffixes)
    prefix_len = np.fromiter(map(len, encoded.prefix_ids), dtype=np.int64, count=len(encoded.prefix_ids))
    suffix_len = np.fromiter(map(len, encoded.suffix_ids), dtype=np.int64, count=len(encoded.suffix_ids))
    return prefix_len[encoded.pair_prefix] + suffix_len


@dataclass(frozen=True)
class AnswerTokens:
    """The tokens a click score is read from: the "Yes" token, and optionally the "No" token.

    With `no`, the score is logit(yes) - logit(no), the log-odds of a softmax over the two answers; it
    starts near 0 for a pretrained LLM, whereas the raw "Yes" logit of one starts near +14 and tuning must
    first spend its steps learning that offset. Without, it is the raw "Yes" logit (the paper's code).
    """

    yes: int
    no: int | None = None

    @property
    def ids(self) -> tuple[int, ...]:
        return (self.yes,) if self.no is None else (self.yes, self.no)


def as_answer_tokens(answer: int | AnswerTokens) -> AnswerTokens:
    """A bare token id means the raw logit of that token."""
    return answer if isinstance(answer, AnswerTokens) else AnswerTokens(int(answer))


def answer_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str, yes: str = " Yes", no: str = " No") -> AnswerTokens:
    """The tokens that follow `prompt` for the answers `yes` and `no` (empty `no`: raw "Yes" logit scores)."""
    yes_id = answer_token_id(tokenizer, prompt, yes)
    no_id = answer_token_id(tokenizer, prompt, no) if no else None
    if no_id == yes_id:
        raise ValueError(f"answers {yes!r} and {no!r} begin with the same token {yes_id}; they cannot be told apart")
    return AnswerTokens(yes_id, no_id)


def answer_token_id(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str = " Yes") -> int:
    """The first token the tokenizer produces for `answer` when it follows `prompt`.

    Tokenising the answer alone can give a different token (" Yes" vs "Yes"), so tokenise prompt + answer
    and take the first token after the prompt's own tokens.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids or len(full_ids) <= n:
        raise ValueError(
            f"cannot derive the answer token for {answer!r}: the prompt's tokens are not a prefix of the tokens of "
            f"prompt + answer (prompt ends with {tokenizer.convert_ids_to_tokens(prompt_ids[-3:])}, "
            f"prompt + answer ends with {tokenizer.convert_ids_to_tokens(full_ids[-4:])}); "
            "the prompt's last token merges with the answer"
        )
    return int(full_ids[n])

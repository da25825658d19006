"""A tuning stage's data: which stages run, the rows each one trains and validates on, and their prompts
as canonical tokens (a user prefix followed by an item suffix) with 0/1 labels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from binllm import data
from binllm.config import PromptConfig, StageConfig, TuneConfig
from binllm.data.schema import DataError
from binllm.llm import EncodedPrompts, encode_prompt_parts
from binllm.prompts import build_prompts
from binllm.tune.code_targets import mix_targets

REQUIRED_COLUMNS = ("user_id", "item_id", "label", "split", "history")


@dataclass
class Stage:
    name: str  # "stage1" or "stage2"
    prompt_kind: str  # "text", "full" or "codes"
    settings: StageConfig


@dataclass
class PromptSet:
    token_ids: list[list[int]]
    labels: np.ndarray  # float32 0/1 click labels
    # Row i's tokens are its prefix's (token_ids[i][:prefix_lengths[i]]) then its suffix's; rows with the same
    # prefix_of_row share the prefix tokens. None: not known (no shared-prefix training).
    prefix_of_row: np.ndarray | None = None  # int64
    prefix_lengths: np.ndarray | None = None  # int64
    # BinMF's click estimate of each row from its codes (float32, NaN without both codes); None: not distilled
    code_estimates: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.token_ids), dtype=np.int64, count=len(self.token_ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    def targets(self, rows: np.ndarray, distill: float) -> np.ndarray:
        """Training targets of `rows`: (1 - distill) x label + distill x code estimate (tune.stageN.distill)."""
        estimates = None if self.code_estimates is None else self.code_estimates[rows]
        return mix_targets(self.labels[rows], estimates, distill)

    def encoded(self, rows: np.ndarray) -> EncodedPrompts:
        """`rows` as prompts with each distinct prefix once; pair j is row rows[j]."""
        if self.prefix_of_row is None or self.prefix_lengths is None:
            raise ValueError("this PromptSet has no prefix/suffix split (build it with tokenize_rows)")
        _, first, pair_prefix = np.unique(self.prefix_of_row[rows], return_index=True, return_inverse=True)
        cut = self.prefix_lengths[rows].tolist()
        prefix_ids = [self.token_ids[r][: cut[j]] for r, j in zip(rows[first].tolist(), first.tolist())]
        suffix_ids = [self.token_ids[r][n:] for r, n in zip(rows.tolist(), cut)]
        return EncodedPrompts(prefix_ids=prefix_ids, suffix_ids=suffix_ids,
                              pair_prefix=pair_prefix.reshape(-1).astype(np.int64))


def tuning_stages(tune: TuneConfig, prompt_kind: str) -> list[Stage]:
    """Two-step: text-only prompts (stage 1), then `prompt_kind` prompts (stage 2); intuitive: stage 2 only."""
    full = Stage("stage2", prompt_kind, tune.stage2)
    if tune.mode == "two_step":
        return [Stage("stage1", "text", tune.stage1), full]
    if tune.mode == "intuitive":
        return [full]
    raise ValueError(f"config key 'tune.mode': expected 'two_step' or 'intuitive', got {tune.mode!r}")


def split_rows(examples: pa.Table, split: str, max_rows: int, seed: int) -> pa.Table:
    """Rows of `split`; at most max_rows of them (0: all), a seeded random subset kept in input order."""
    missing = [c for c in REQUIRED_COLUMNS if c not in examples.column_names]
    if missing:
        raise DataError(f"examples: missing column(s) {missing}; has {examples.column_names}")
    return data.split_rows(examples, split, max_rows, seed)


def stage_rows(examples: pa.Table, settings: StageConfig, seed: int) -> tuple[pa.Table, pa.Table]:
    """A tuning stage's (train rows, valid rows): seeded subsets of at most max_train_rows / max_valid_rows (the
    valid sample seeded seed + 1)."""
    return (split_rows(examples, "train", settings.max_train_rows, seed),
            split_rows(examples, "valid", settings.max_valid_rows, seed + 1))


def tokenize_rows(rows: pa.Table, items: pa.Table, user_codes: pa.Table | None, item_codes: pa.Table | None,
                  prompt: PromptConfig, kind: str, tokenizer: PreTrainedTokenizerBase) -> tuple[PromptSet, str]:
    """Canonical prompt tokens and labels of `rows`; also one prompt text (for the answer token)."""
    batch = build_prompts(rows, items, user_codes, item_codes, prompt, kind=kind, tokenizer=tokenizer)
    labels = rows.column("label").to_numpy(zero_copy_only=False).astype(np.float32)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise DataError("examples: column 'label' must hold 0/1 values")
    encoded = encode_prompt_parts(tokenizer, batch.prefix, batch.suffix)
    prefix_lengths = np.fromiter(map(len, encoded.prefix_ids), dtype=np.int64, count=len(encoded.prefix_ids))
    prompts = PromptSet(encoded.sequences(), labels, prefix_of_row=encoded.pair_prefix,
                        prefix_lengths=prefix_lengths[encoded.pair_prefix])
    return prompts, batch.prefix[0] + batch.suffix[0]

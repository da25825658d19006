"""Scoring (user, item) pairs with a trained encoder: BinMF <h_u, h_i> over hard codes, or MF <e_u, e_i>."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import torch

from binllm.encoder.model import BinaryEncoder, MatrixFactorization
from binllm.encoder.train import EncoderResult
from binllm.encoder.vocab import as_string_array, lookup
from binllm.metrics import auc

CHUNK = 1 << 18


def side_vectors(model: BinaryEncoder | MatrixFactorization, side: str) -> torch.Tensor:
    """float32 vectors whose dot products are the model's logits: ±1 codes (BinMF) or embeddings (MF)."""
    if isinstance(model, BinaryEncoder):
        return model.codes(side)
    if isinstance(model, MatrixFactorization):
        return model.embeddings(side)
    raise TypeError(f"cannot score with a {type(model).__name__}; expected BinaryEncoder or MatrixFactorization")


def score_pairs(result: EncoderResult, user_ids: Iterable[str] | pa.Array, item_ids: Iterable[str] | pa.Array) -> np.ndarray:
    """float32 logits of each (user_ids[k], item_ids[k]) pair; 0.0 where the user or the item has no embedding."""
    users = lookup(result.user_ids, as_string_array(user_ids, "user_ids"))
    items = lookup(result.item_ids, as_string_array(item_ids, "item_ids"))
    if len(users) != len(items):
        raise ValueError(f"score_pairs: {len(users)} user ids but {len(items)} item ids")
    user_vectors = side_vectors(result.model, "user").cpu()
    item_vectors = side_vectors(result.model, "item").cpu()
    scores = np.zeros(len(users), dtype=np.float32)
    known = np.flatnonzero((users >= 0) & (items >= 0))
    for start in range(0, len(known), CHUNK):
        rows = known[start:start + CHUNK]
        u = user_vectors[torch.from_numpy(users[rows])]
        i = item_vectors[torch.from_numpy(items[rows])]
        scores[rows] = (u * i).sum(-1).numpy()
    return scores


def rows_auc(result: EncoderResult, rows: pa.Table) -> float:
    """The encoder's AUC on `rows` (columns user_id, item_id, label): the bar an LLM validated on them must pass."""
    logits = score_pairs(result, rows.column("user_id"), rows.column("item_id"))
    return float(auc(rows.column("label").to_numpy(zero_copy_only=False), logits))

"""Id vocabularies: string ids <-> embedding rows."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def as_string_array(ids: Iterable[str] | np.ndarray | pa.Array | pa.ChunkedArray, what: str) -> pa.Array:
    """ids as one Arrow string array; raises naming `what` when they are not strings."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not isinstance(ids, pa.Array):
        ids = pa.array(np.asarray(ids, dtype=object) if not isinstance(ids, np.ndarray) else ids.astype(object))
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    if pa.types.is_large_string(ids.type) or pa.types.is_string_view(ids.type):
        ids = ids.cast(pa.string())
    if not pa.types.is_string(ids.type):
        raise TypeError(f"{what}: expected string ids, got Arrow type {ids.type}")
    return ids


def build_vocabulary(ids: pa.Array) -> np.ndarray:
    """Sorted distinct ids (nulls dropped), as an object array of str; index = embedding row."""
    distinct = pc.unique(ids.drop_null())
    return distinct.take(pc.array_sort_indices(distinct)).to_numpy(zero_copy_only=False)


def lookup(vocabulary: np.ndarray, ids: pa.Array) -> np.ndarray:
    """Embedding rows of `ids` (int64); -1 for ids not in the vocabulary (and for nulls)."""
    rows = pc.index_in(ids, value_set=pa.array(vocabulary, type=pa.string()))
    return pc.fill_null(rows, -1).to_numpy(zero_copy_only=False).astype(np.int64)

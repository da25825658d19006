"""Per-user work of the scoring pipeline, vectorised over an Arrow block that holds every row of its users.

The interaction log, the requests (or the active users) are normalised to one schema, tagged by `role`,
and hash-partitioned by user_id; `PairBuilder` then turns a partition into (user_id, item_id, prefix,
suffix, fallback) rows: each user's history (last N positives before the cutoff, oldest first), the
requested pairs or the user's top-K candidates by Hamming distance, and the compressed prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm import candidates, codes, storage
from binllm.config import PromptConfig, StorageConfig
from binllm.data.schema import as_timestamps
from binllm.prompts import build_prompts

LOG, REQUEST, ACTIVE = 0, 1, 2
UNION_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("timestamp", pa.int64()),
    ("positive", pa.bool_()),
    ("role", pa.int8()),
])
PAIR_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("prefix", pa.string()),
    ("suffix", pa.string()),
    ("fallback", pa.bool_()),
])


def _ids(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.cast(pa.string())


def _tagged(n: int, role: int, user_id: pa.Array, item_id: pa.Array | None = None,
            timestamp: pa.Array | None = None, positive: pa.Array | None = None) -> pa.Table:
    return pa.Table.from_arrays([
        user_id,
        item_id if item_id is not None else pa.nulls(n, pa.string()),
        timestamp if timestamp is not None else pa.nulls(n, pa.int64()),
        positive if positive is not None else pa.nulls(n, pa.bool_()),
        pa.array(np.full(n, role, dtype=np.int8)),
    ], schema=UNION_SCHEMA)


def timestamp_seconds(column: pa.ChunkedArray) -> pa.Array:
    """Unix seconds of the interaction log's timestamps (ms / us / ns converted as prepare does)."""
    return as_timestamps(pa.chunked_array([column.combine_chunks()]), "interaction log", "timestamp").combine_chunks()


def normalise_log(batch: pa.Table, history_before: int, min_rating: float) -> pa.Table:
    """Interaction rows before the cutoff, with `positive` from label == 1 or rating >= min_rating."""
    timestamp = timestamp_seconds(batch.column("timestamp"))
    if "label" in batch.column_names:
        positive = pc.equal(batch.column("label").combine_chunks().cast(pa.int64()), 1)
    else:
        positive = pc.greater_equal(batch.column("rating").combine_chunks().cast(pa.float64()), min_rating)
    table = _tagged(batch.num_rows, LOG, _ids(batch.column("user_id")), _ids(batch.column("item_id")),
                    timestamp, positive.fill_null(False))
    return table.filter(pc.less(timestamp, history_before))


def normalise_requests(batch: pa.Table) -> pa.Table:
    return _tagged(batch.num_rows, REQUEST, _ids(batch.column("user_id")), _ids(batch.column("item_id")))


def normalise_users(batch: pa.Table) -> pa.Table:
    return _tagged(batch.num_rows, ACTIVE, _ids(batch.column("user_id")))


def user_histories(log: pa.Table, max_len: int) -> tuple[pa.Array, pa.ListArray]:
    """(users, histories): each user's last `max_len` positive items, oldest first; ties by item id."""
    positives = log.filter(log.column("positive"))
    positives = positives.take(pc.sort_indices(
        positives, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]))
    users = _ids(positives.column("user_id"))
    n = len(users)
    if n == 0:
        return pa.array([], pa.string()), pa.array([], pa.list_(pa.string()))
    starts = np.flatnonzero(np.concatenate(
        [[True], pc.not_equal(users.slice(1), users.slice(0, n - 1)).to_numpy(zero_copy_only=False)]))
    group = np.repeat(np.arange(starts.size), np.diff(np.append(starts, n)))
    group_end = np.append(starts[1:], n)
    keep = (group_end[group] - np.arange(n)) <= max_len
    counts = np.bincount(group[keep], minlength=starts.size)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    items = _ids(positives.column("item_id")).filter(pa.array(keep))
    return users.take(pa.array(starts)), pa.ListArray.from_arrays(pa.array(offsets), items)


def attach_histories(user_ids: pa.Array, users: pa.Array, histories: pa.ListArray) -> pa.ListArray:
    """histories[user] per row of `user_ids`, an empty list for users without one."""
    padded = pa.ListArray.from_arrays(
        pa.concat_arrays([histories.offsets, pa.array([histories.offsets[-1].as_py()], pa.int32())]),
        histories.flatten())
    index = pc.index_in(user_ids, value_set=users).fill_null(len(users))
    return padded.take(index)


@dataclass
class PairSpec:
    """Everything a partition needs. `key` (the run id) names the tables a worker process caches."""

    key: str
    items: str
    user_codes: str
    item_codes: str
    storage: StorageConfig
    prompt: PromptConfig
    history_len: int
    top_k: int
    popular: list[str]  # most interacted item ids first, for candidate users without a code
    tokenizer: object = None  # the LLM's tokenizer: prompt.max_title_tokens and prompt.max_tokens count its tokens


class PairBuilder:
    def __init__(self, spec: PairSpec):
        self.spec = spec
        self.items = storage.read_table(spec.items, spec.storage, what="item catalog")
        self.user_codes = storage.read_table(spec.user_codes, spec.storage, what="user code table")
        self.item_codes = storage.read_table(spec.item_codes, spec.storage, what="item code table")
        self.user_code_ids, self.user_packed = codes.read_code_table(self.user_codes, spec.user_codes)
        self.item_code_ids, self.item_packed = codes.read_code_table(self.item_codes, spec.item_codes)
        self.user_code_id_array = pa.array(self.user_code_ids, pa.string())
        self.item_code_id_array = pa.array(self.item_code_ids, pa.string())
        self.popular = pa.array(spec.popular, pa.string())

    def candidates(self, users: pa.Array, log: pa.Table) -> pa.Table:
        """(user_id, item_id) of each active user's top-K unseen items: by Hamming distance for users with a
        code, by popularity for users without one."""
        users = pc.unique(users)
        code_index = pc.index_in(users, value_set=self.user_code_id_array)
        has_code = pc.is_valid(code_index).to_numpy(zero_copy_only=False)
        seen_user = _ids(log.column("user_id"))
        seen_item = _ids(log.column("item_id"))
        parts = []
        coded = users.filter(pa.array(has_code))
        if len(coded):
            packed = self.user_packed[code_index.filter(pa.array(has_code)).to_numpy(zero_copy_only=False)]
            rows, cols = _seen_pairs(seen_user, seen_item, coded, self.item_code_id_array)
            seen = candidates.SeenItems.from_pairs(rows, cols, len(coded))
            u, i, _ = candidates.top_k_hamming(packed, self.item_packed, self.spec.top_k, seen, num_threads=1)
            parts.append(candidates.candidate_table(coded.to_numpy(zero_copy_only=False), self.item_code_ids, u, i, None))
        uncoded = users.filter(pa.array(~has_code))
        if len(uncoded) and len(self.popular):
            rows, cols = _seen_pairs(seen_user, seen_item, uncoded, self.popular)
            seen = candidates.SeenItems.from_pairs(rows, cols, len(uncoded))
            u, i = candidates.top_k_popular(np.arange(len(self.popular)), self.spec.top_k, seen, np.arange(len(uncoded)))
            parts.append(candidates.candidate_table(uncoded.to_numpy(zero_copy_only=False),
                                                    self.popular.to_numpy(zero_copy_only=False), u, i, None))
        if not parts:
            return pa.table({"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string())})
        return pa.concat_tables(parts).select(["user_id", "item_id"])

    def __call__(self, block: pa.Table) -> pa.Table:
        role = block.column("role").combine_chunks()
        log = block.filter(pc.equal(role, LOG))
        requests = block.filter(pc.equal(role, REQUEST)).select(["user_id", "item_id"])
        active = block.filter(pc.equal(role, ACTIVE))
        if active.num_rows:
            requests = pa.concat_tables([requests, self.candidates(_ids(active.column("user_id")), log)])
        if requests.num_rows == 0:
            return PAIR_SCHEMA.empty_table()
        users, histories = user_histories(log, self.spec.history_len)
        rows = requests.append_column("history", attach_histories(_ids(requests.column("user_id")), users, histories))
        batch = build_prompts(rows, self.items, self.user_codes, self.item_codes, self.spec.prompt,
                              tokenizer=self.spec.tokenizer)
        out = pa.table({
            "user_id": _ids(rows.column("user_id")),
            "item_id": _ids(rows.column("item_id")),
            "prefix": pa.array(batch.prefix, pa.string()),
            "suffix": pa.array(batch.suffix, pa.string()),
            "fallback": pa.array(batch.fallback, pa.bool_()),
        })
        # One user's pairs stay adjacent (same prefix), and similar lengths end up in the same batches.
        keys = out.append_column("prefix_len", pc.utf8_length(out.column("prefix"))).append_column(
            "suffix_len", pc.utf8_length(out.column("suffix")))
        order = pc.sort_indices(keys, sort_keys=[("prefix_len", "ascending"), ("user_id", "ascending"),
                                                 ("suffix_len", "ascending"), ("item_id", "ascending")])
        return out.take(order)


def _seen_pairs(log_users: pa.Array, log_items: pa.Array, users: pa.Array, items: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(user position in `users`, item position in `items`) of every log row whose user and item are both there."""
    u = pc.index_in(log_users, value_set=users)
    i = pc.index_in(log_items, value_set=items)
    both = pc.and_(pc.is_valid(u), pc.is_valid(i))
    return (u.filter(both).to_numpy(zero_copy_only=False).astype(np.int64),
            i.filter(both).to_numpy(zero_copy_only=False).astype(np.int64))


_BUILDERS: dict[str, PairBuilder] = {}


def build_pairs(block: pa.Table, spec: PairSpec) -> pa.Table:
    """Ray Data task body: a worker process keeps the latest run's PairBuilder across tasks."""
    builder = _BUILDERS.get(spec.key)
    if builder is None:
        _BUILDERS.clear()
        builder = _BUILDERS[spec.key] = PairBuilder(spec)
    return builder(block)

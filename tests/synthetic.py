"""Synthetic click data with planted collaborative structure, in the prepared-examples contract.

Users and items fall into 4 latent clusters; a user clicks (label 1) an item of its own cluster with
probability 0.9 and any other item with probability 0.1. Titles carry a cluster word, so a text-only
model can find the structure too. Rows are split by time: 80% train, 10% valid, 10% test.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

N_CLUSTERS = 4
CLUSTER_WORDS = ("Space", "Romance", "Crime", "Cartoon")
START_TIME = 1_600_000_000


def make_planted_examples(n_users: int, n_items: int, n_rows: int, seed: int,
                          *, history_len: int = 10) -> tuple[pa.Table, pa.Table]:
    """(examples: user_id, item_id, label int8, timestamp int64, split, history list<string>, warm bool;
    items: item_id, title). Ids are 'u<k>' and 'i<k>'."""
    rng = np.random.default_rng(seed)
    user_cluster = rng.integers(0, N_CLUSTERS, n_users)
    item_cluster = rng.integers(0, N_CLUSTERS, n_items)
    users = rng.integers(0, n_users, n_rows)
    items = rng.integers(0, n_items, n_rows)
    same = user_cluster[users] == item_cluster[items]
    labels = (rng.random(n_rows) < np.where(same, 0.9, 0.1)).astype(np.int8)
    timestamps = START_TIME + np.sort(rng.choice(n_rows * 60, n_rows, replace=False)).astype(np.int64)

    n_train, n_valid = int(n_rows * 0.8), int(n_rows * 0.1)
    split = np.array(["train"] * n_train + ["valid"] * n_valid + ["test"] * (n_rows - n_train - n_valid), dtype=object)
    user_ids = np.array([f"u{u}" for u in range(n_users)], dtype=object)
    item_ids = np.array([f"i{i}" for i in range(n_items)], dtype=object)

    histories, earlier_clicks = [], {}
    for u, i, y in zip(users.tolist(), items.tolist(), labels.tolist()):
        clicks = earlier_clicks.setdefault(u, [])
        histories.append(clicks[-history_len:] if history_len else [])
        if y:
            clicks.append(item_ids[i])
    train_users, train_items = set(users[:n_train].tolist()), set(items[:n_train].tolist())
    warm = np.array([u in train_users and i in train_items for u, i in zip(users.tolist(), items.tolist())])

    examples = pa.table({
        "user_id": pa.array(user_ids[users], type=pa.string()),
        "item_id": pa.array(item_ids[items], type=pa.string()),
        "label": pa.array(labels, type=pa.int8()),
        "timestamp": pa.array(timestamps, type=pa.int64()),
        "split": pa.array(split, type=pa.string()),
        "history": pa.array(histories, type=pa.list_(pa.string())),
        "warm": pa.array(warm, type=pa.bool_()),
    })
    titles = [f"{CLUSTER_WORDS[c]} Story {k}" for k, c in enumerate(item_cluster.tolist())]
    catalog = pa.table({"item_id": pa.array(item_ids, type=pa.string()), "title": pa.array(titles, type=pa.string())})
    return examples, catalog


def make_code_signal_examples(n_users: int, n_items: int, n_rows: int, seed: int
                              ) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    """Examples whose label is a known function of the codes alone: 1 when the user's and the item's
    32-bit codes hold more 1 bits together than the median row. Every title is the same, so text carries
    no signal. Returns (examples, items, user code table, item code table); 80/10/10 split by row order."""
    from binllm.codes import code_table

    rng = np.random.default_rng(seed)
    user_codes = rng.integers(0, 256, (n_users, 4), dtype=np.uint8)
    item_codes = rng.integers(0, 256, (n_items, 4), dtype=np.uint8)
    ones = lambda codes: np.unpackbits(codes, axis=1).sum(axis=1)  # noqa: E731
    users, items = rng.integers(0, n_users, n_rows), rng.integers(0, n_items, n_rows)
    affinity = ones(user_codes)[users] + ones(item_codes)[items]
    labels = (affinity > np.median(affinity)).astype(np.int8)
    n_train, n_valid = int(n_rows * 0.8), int(n_rows * 0.1)
    examples = pa.table({
        "user_id": pa.array([f"u{u}" for u in users.tolist()], pa.string()),
        "item_id": pa.array([f"i{i}" for i in items.tolist()], pa.string()),
        "label": pa.array(labels),
        "timestamp": pa.array(START_TIME + np.arange(n_rows, dtype=np.int64) * 60),
        "split": pa.array(["train"] * n_train + ["valid"] * n_valid + ["test"] * (n_rows - n_train - n_valid)),
        "history": pa.array([[] for _ in range(n_rows)], pa.list_(pa.string())),
        "warm": pa.array(np.ones(n_rows, dtype=bool)),
    })
    catalog = pa.table({"item_id": [f"i{k}" for k in range(n_items)], "title": ["A film"] * n_items})
    return (examples, catalog, code_table([f"u{k}" for k in range(n_users)], user_codes),
            code_table([f"i{k}" for k in range(n_items)], item_codes))

"""Labels, time split, histories and warm/cold flags: interactions -> examples, column-wise."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm.config import DataConfig, SplitConfig
from binllm.data.schema import DataError

log = logging.getLogger(__name__)

SPLITS = np.array(["train", "valid", "test"], dtype=object)

EXAMPLES = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("label", pa.int8()), ("timestamp", pa.int64()),
    ("split", pa.string()), ("history", pa.list_(pa.string())), ("warm", pa.bool_()), ("rating", pa.float64()),
])


def split_rows(examples: pa.Table, split: str, max_rows: int = 0, seed: int = 0) -> pa.Table:
    """Rows of `split`; at most max_rows of them (0: all), a seeded random subset kept in input order."""
    rows = examples.filter(pc.equal(examples.column("split"), split))
    if max_rows and rows.num_rows > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(rows.num_rows, max_rows, replace=False))
        rows = rows.take(pa.array(keep))
    return rows


def labels_from(interactions: pa.Table, min_rating: float) -> np.ndarray:
    """Per row: the given 0/1 label where present, else rating >= min_rating."""
    from_rating = pc.cast(pc.greater_equal(interactions.column("rating"), min_rating), pa.int8())
    labels = pc.coalesce(interactions.column("label"), from_rating)
    if labels.null_count:
        raise DataError(f"interactions: {labels.null_count} rows with neither a rating nor a label")
    return labels.to_numpy().astype(np.int8)


def month_index(timestamps: np.ndarray) -> np.ndarray:
    """Calendar months (UTC) since the first month of the log."""
    months = timestamps.astype("datetime64[s]").astype("datetime64[M]").astype(np.int64)
    return months - months.min()


def assign_split(timestamps: np.ndarray, order: np.ndarray, split: SplitConfig) -> np.ndarray:
    """Split code per row: 0 train, 1 valid, 2 test, -1 dropped. `order` sorts rows by time."""
    n = len(timestamps)
    code = np.full(n, -1, dtype=np.int8)
    if split.kind == "fractions":
        n_train = int(np.floor(n * split.fractions[0]))
        n_valid = int(np.floor(n * (split.fractions[0] + split.fractions[1]))) - n_train
        ranks = np.empty(n, dtype=np.int64)
        ranks[order] = np.arange(n)
        code[:] = np.where(ranks < n_train, 0, np.where(ranks < n_train + n_valid, 1, 2))
    elif split.kind == "months":
        months = month_index(timestamps)
        for value, window in enumerate((split.train_months, split.valid_months, split.test_months)):
            if len(window) != 2 or window[0] > window[1]:
                raise DataError(f"config key 'data.split.*_months': expected [first, last], got {window}")
            code[(months >= window[0]) & (months <= window[1])] = value
    else:
        if split.valid_start is None or split.test_start is None or split.valid_start > split.test_start:
            raise DataError("config keys 'data.split.valid_start' and 'data.split.test_start' are required "
                            "for kind 'timestamps', with valid_start <= test_start")
        lo = split.start if split.start is not None else np.iinfo(np.int64).min
        hi = split.end if split.end is not None else np.iinfo(np.int64).max
        inside = (timestamps >= lo) & (timestamps < hi)
        code[inside] = np.where(timestamps[inside] < split.valid_start, 0,
                                np.where(timestamps[inside] < split.test_start, 1, 2))
    return code


def histories(users: np.ndarray, positives: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by (user, time): the last `max_len` positive rows strictly before each row, same user.

    Returns (offsets, flat row indices) of a list column, oldest first.
    """
    n = len(users)
    pos_rows = np.flatnonzero(positives)
    before = np.cumsum(positives) - positives  # positives among earlier rows, all users
    user_start = np.r_[True, users[1:] != users[:-1]]
    first_of_user = np.maximum.accumulate(np.where(user_start, np.arange(n), 0))
    user_first_pos = before[first_of_user]
    start = np.maximum(user_first_pos, before - max_len)
    lengths = before - start
    offsets = np.r_[0, np.cumsum(lengths)]
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    flat = pos_rows[np.repeat(start, lengths) + within]
    return offsets.astype(np.int32), flat


def warm_flags(user_ids: pa.Array, item_ids: pa.Array, train: np.ndarray, min_train: int) -> np.ndarray:
    """A row is warm when its user and its item each have at least `min_train` train-split rows
    (1: both seen in train; the official BinLLM code uses more than 3, i.e. 4)."""
    def enough(ids: pa.Array) -> np.ndarray:
        counts = pc.value_counts(pc.filter(ids, pa.array(train)))
        frequent = pc.filter(counts.field("values"), pc.greater_equal(counts.field("counts"), min_train))
        return pc.is_in(ids, value_set=frequent).to_numpy(zero_copy_only=False)

    return enough(user_ids) & enough(item_ids)


def check_rows(interactions: pa.Table, cfg: DataConfig) -> pa.Table:
    """Counts exact duplicate rows and ratings outside data.rating_scale; data.bad_rows decides whether
    they are dropped (with a logged count) or refused (a DataError naming the counts)."""
    keys = ["user_id", "item_id", "rating", "label", "timestamp"]
    first = pa.array(~interactions.select(keys).to_pandas().duplicated(keep="first").to_numpy())
    duplicates = interactions.num_rows - int(pc.sum(first).as_py() or 0)
    rating = interactions.column("rating")
    low, high = cfg.rating_scale
    outside = pc.fill_null(pc.or_(pc.less(rating, low), pc.greater(rating, high)), False)
    out_of_scale = int(pc.sum(outside).as_py() or 0)
    if not duplicates and not out_of_scale:
        return interactions
    found = (f"interactions: {duplicates} exact duplicate rows and {out_of_scale} ratings outside "
             f"data.rating_scale [{low:g}, {high:g}]")
    if cfg.bad_rows == "refuse":
        raise DataError(f"{found}; data.bad_rows is 'refuse' (set it to 'drop' to drop them)")
    log.warning("%s: dropped (data.bad_rows: drop)", found)
    return interactions.filter(pc.and_(first, pc.invert(outside)))


def prepare_examples(interactions: pa.Table, cfg: DataConfig) -> pa.Table:
    """Labelled, time-split examples with histories and warm flags, sorted by time (see EXAMPLES)."""
    if interactions.num_rows == 0:
        raise DataError("interactions: no rows to prepare")
    interactions = check_rows(interactions, cfg)
    labels = labels_from(interactions, cfg.min_rating)
    timestamps = interactions.column("timestamp").to_numpy()
    time_order = np.lexsort((np.arange(len(timestamps)), timestamps))
    split = assign_split(timestamps, time_order, cfg.split)
    kept = time_order[split[time_order] >= 0]
    if len(kept) == 0:
        raise DataError(f"data.split: no rows fall inside the configured {cfg.split.kind} windows")

    rows = interactions.take(pa.array(kept))
    users = np.asarray(rows.column("user_id").to_pylist(), dtype=object)
    items = rows.column("item_id").combine_chunks()
    labels, split = labels[kept], split[kept]
    # Within each user, rows keep time order (stable sort over the time-ordered rows).
    by_user = np.argsort(users, kind="stable")
    offsets, flat = histories(users[by_user], labels[by_user].astype(bool), cfg.history_len)
    hist_items = pc.take(items, pa.array(by_user[flat]))
    history_by_user = pa.ListArray.from_arrays(pa.array(offsets), hist_items)
    inverse = np.empty_like(by_user)
    inverse[by_user] = np.arange(len(by_user))
    history = pc.take(history_by_user, pa.array(inverse))

    warm = warm_flags(rows.column("user_id").combine_chunks(), items, split == 0, cfg.warm_min_train)
    return pa.table({
        "user_id": rows.column("user_id"),
        "item_id": items,
        "label": pa.array(labels, type=pa.int8()),
        "timestamp": rows.column("timestamp"),
        "split": pa.array(SPLITS[split], type=pa.string()),
        "history": history.cast(pa.list_(pa.string())),
        "warm": pa.array(warm),
        "rating": rows.column("rating"),
    }, schema=EXAMPLES)

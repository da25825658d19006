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


def _observed_range(rating: pa.ChunkedArray) -> tuple[float, float] | None:
    if rating.null_count == len(rating):
        return None
    bounds = pc.min_max(rating).as_py()
    return float(bounds["min"]), float(bounds["max"])


def iso_date(timestamp: int) -> str:
    return str(np.datetime64(timestamp, "s").astype("datetime64[D]"))


def describe_split(split: SplitConfig) -> str:
    """The keys of the configured split, as errors name them."""
    if split.kind == "fractions":
        return f"data.split.fractions {split.fractions}"
    if split.kind == "months":
        return (f"data.split train_months {split.train_months}, valid_months {split.valid_months}, test_months "
                f"{split.test_months}, months since the log's first month")
    return (f"data.split valid_start {split.valid_start}, test_start {split.test_start}, start {split.start}, "
            f"end {split.end}")


def check_rows(interactions: pa.Table, cfg: DataConfig, source: str = "interactions",
               report: dict | None = None) -> pa.Table:
    """Counts exact duplicate rows and ratings outside data.rating_scale (when unset: the observed min..max, so
    none); data.bad_rows decides whether they are dropped (with a logged count) or refused (a DataError naming
    the counts). A set scale that leaves more than data.max_out_of_scale of the ratings outside is refused,
    naming the observed range."""
    report = {} if report is None else report
    keys = ["user_id", "item_id", "rating", "label", "timestamp"]
    first = pa.array(~interactions.select(keys).to_pandas().duplicated(keep="first").to_numpy())
    duplicates = interactions.num_rows - int(pc.sum(first).as_py() or 0)
    rating = interactions.column("rating")
    observed = _observed_range(rating)
    inferred = not cfg.rating_scale
    low, high = observed if inferred and observed else (cfg.rating_scale or [float("nan")] * 2)
    outside = pc.fill_null(pc.or_(pc.less(rating, low), pc.greater(rating, high)), False)
    out_of_scale = int(pc.sum(outside).as_py() or 0)
    report.update({"duplicates": duplicates, "out_of_scale": out_of_scale, "observed_ratings": observed,
                   "rating_scale": None if observed is None else [low, high], "rating_scale_inferred": inferred})
    if not duplicates and not out_of_scale:
        return interactions
    found = (f"interactions: {duplicates} exact duplicate rows and {out_of_scale} ratings outside "
             f"data.rating_scale [{low:g}, {high:g}]")
    if cfg.bad_rows == "refuse":
        raise DataError(f"{found}; data.bad_rows is 'refuse' (set it to 'drop' to drop them)")
    rated = len(rating) - rating.null_count
    if out_of_scale > cfg.max_out_of_scale * rated:
        raise DataError(
            f"{source}: {out_of_scale} of {rated} ratings ({out_of_scale / rated:.1%}) fall outside data.rating_scale "
            f"[{low:g}, {high:g}]; the ratings run from {observed[0]:g} to {observed[1]:g}: set data.rating_scale to "
            f"[{observed[0]:g}, {observed[1]:g}] (or null: inferred from the ratings), or raise "
            f"data.max_out_of_scale (now {cfg.max_out_of_scale:g}) to drop them")
    log.warning("%s: dropped (data.bad_rows: drop)", found)
    return interactions.filter(pc.and_(first, pc.invert(outside)))


def _suggested_min_rating(rating: pa.ChunkedArray, low: float, high: float) -> float:
    """The lowest observed rating in the top 30% of the range (MovieLens 1-5: 4; a 1-10 scale: 8)."""
    values = np.unique(rating.drop_null().to_numpy())
    above = values[values >= low + 0.7 * (high - low)]
    return float(above[0] if len(above) else values[-1])


def feedback_labels(interactions: pa.Table, cfg: DataConfig, report: dict | None = None) -> np.ndarray:
    """Labels per row: a 0/1 label where given, else rating >= data.min_rating. A log whose feedback holds one
    value (every label 1, every rating equal, or no feedback column) is implicit (reads or clicks only): with
    data.negatives.k every row is a positive. `report` receives what the checks at prepare need (the ratings'
    range, a suggested data.min_rating, why the log is implicit); binllm.data.profile refuses what cannot train."""
    report = {} if report is None else report
    rating = interactions.column("rating")
    observed = _observed_range(rating)
    labels = labels_from(interactions, cfg.min_rating)
    from_label = interactions.column("label").null_count == 0  # every row has a 0/1 label: ratings unused
    implicit = ""
    if observed is None or from_label:
        if labels.min() == 1:
            implicit = ("no rating or label column is mapped (data.columns.rating and data.columns.label are empty)"
                        if cfg.format == "table" and not cfg.columns.rating and not cfg.columns.label
                        else "column 'label' holds 1 on every row")
    elif observed[0] == observed[1]:
        implicit = f"every rating is {observed[0]:g}"
    report.update({"observed_ratings": observed, "implicit": implicit or None,
                   "labels_from": "label" if from_label or observed is None else "rating",
                   "suggested_min_rating": None if observed is None else _suggested_min_rating(rating, *observed)})
    if implicit and cfg.negatives.k:
        return np.ones(len(labels), dtype=np.int8)
    return labels


NEGATIVE_ROUNDS = 20  # rejection-sampling rounds; positives whose user touched (nearly) every item get fewer


def sample_negatives(interactions: pa.Table, labels: np.ndarray, k: int, sampling: str, seed: int
                     ) -> tuple[np.ndarray, pa.Array]:
    """k negatives per positive row, each an item its user never touched (no row of the log) and drawn at most
    once per user: uniform over the log's items, or in proportion to their rows (popularity); seeded.
    Returns (the positive row each negative belongs to, the negative items), positives in row order."""
    users = pc.dictionary_encode(interactions.column("user_id").combine_chunks())
    items = pc.dictionary_encode(interactions.column("item_id").combine_chunks())
    u = users.indices.to_numpy().astype(np.int64)
    i = items.indices.to_numpy().astype(np.int64)
    n_items = len(items.dictionary)
    touched = np.unique(u * n_items + i)
    owner = np.repeat(np.flatnonzero(labels == 1), k)
    want_user = u[owner]
    drawn = np.full(len(owner), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(np.bincount(i, minlength=n_items)).astype(np.float64)
    taken = np.zeros(0, dtype=np.int64)
    pending = np.arange(len(owner))
    for _ in range(NEGATIVE_ROUNDS):
        if not len(pending):
            break
        if sampling == "popularity":
            draw = np.searchsorted(cumulative, rng.random(len(pending)) * cumulative[-1], side="right")
        else:
            draw = rng.integers(0, n_items, len(pending))
        keys = want_user[pending] * n_items + draw
        ok = ~np.isin(keys, touched) & ~np.isin(keys, taken)
        _, first = np.unique(keys, return_index=True)
        once = np.zeros(len(keys), dtype=bool)
        once[first] = True
        ok &= once
        drawn[pending[ok]] = draw[ok]
        taken = np.union1d(taken, keys[ok])
        pending = pending[~ok]
    got = drawn >= 0
    return owner[got], pc.take(items.dictionary, pa.array(drawn[got]))


def add_negatives(interactions: pa.Table, labels: np.ndarray, cfg: DataConfig, report: dict
                  ) -> tuple[pa.Table, np.ndarray]:
    """The log with data.negatives.k sampled negatives per positive (label 0, no rating, the positive's
    timestamp), each placed just before its positive so both share the same history."""
    neg = cfg.negatives
    owner, neg_items = sample_negatives(interactions, labels, neg.k, neg.sampling, neg.seed)
    wanted = int(labels.sum()) * neg.k
    report.update({"negatives": len(owner), "negatives_short": wanted - len(owner)})
    if wanted > len(owner):
        log.warning("data.negatives: %d of %d negatives could not be drawn (their users touched nearly every item)",
                    wanted - len(owner), wanted)
    negatives = pa.table({
        "user_id": pc.take(interactions.column("user_id"), pa.array(owner)),
        "item_id": neg_items,
        "rating": pa.nulls(len(owner), pa.float64()),
        "label": pa.array(np.zeros(len(owner), np.int8)),
        "timestamp": pc.take(interactions.column("timestamp"), pa.array(owner)),
    }, schema=interactions.schema)
    # Sort key: a negative just before its positive (ties keep the draw order), originals in row order.
    key = np.concatenate([np.arange(interactions.num_rows, dtype=np.float64) + 0.5, owner.astype(np.float64)])
    order = np.argsort(key, kind="stable")
    combined = pa.concat_tables([interactions, negatives]).take(pa.array(order))
    return combined, np.concatenate([labels, np.zeros(len(owner), np.int8)])[order]


def prepare_examples(interactions: pa.Table, cfg: DataConfig, *, source: str = "interactions",
                     report: dict | None = None) -> pa.Table:
    """Labelled, time-split examples with histories and warm flags, sorted by time (see EXAMPLES).

    `source` names the log in errors; `report`, when given, receives what the data profile counts (rows read,
    dropped by reason, sampled negatives, the rating scale and whether it was inferred)."""
    report = {} if report is None else report
    if interactions.num_rows == 0:
        raise DataError("interactions: no rows to prepare")
    report["read"] = interactions.num_rows
    interactions = check_rows(interactions, cfg, source, report)
    report["after_bad_rows"] = interactions.num_rows
    labels = feedback_labels(interactions, cfg, report)
    report["negatives"] = report["negatives_short"] = 0
    if cfg.negatives.k:
        interactions, labels = add_negatives(interactions, labels, cfg, report)
    timestamps = interactions.column("timestamp").to_numpy()
    time_order = np.lexsort((np.arange(len(timestamps)), timestamps))
    split = assign_split(timestamps, time_order, cfg.split)
    kept = time_order[split[time_order] >= 0]
    report["outside_split"] = len(timestamps) - len(kept)
    if len(kept) == 0:
        first, last = (iso_date(int(t)) for t in (timestamps.min(), timestamps.max()))
        raise DataError(f"data.split: no rows fall inside the configured {cfg.split.kind} windows "
                        f"({describe_split(cfg.split)}); the log runs from {first} to {last}")

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

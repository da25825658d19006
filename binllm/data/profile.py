"""The data profile of a prepared run (`examples/profile.json` and a short table), and the checks at prepare
that refuse what cannot train, each as one line naming the file, key or column and what to set.

The profile: rows read, kept and dropped by reason, sampled negatives, users and items, the rating histogram,
the positive rate overall and per split, split sizes and time windows, warm shares, the history length
distribution, items without a title, and the share of test users and items never seen in train.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm.config import DataConfig
from binllm.data.prepare import SPLITS, describe_split, iso_date
from binllm.data.schema import DataError

PROFILE_FILE = "profile.json"
HISTOGRAM_VALUES = 20  # more distinct ratings than this: 10 equal-width bins


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def rating_histogram(rating: pa.ChunkedArray) -> dict[str, int]:
    """Rows per rating value (ratings of the kept rows; sampled negatives have none), or per bin when the
    ratings take more than HISTOGRAM_VALUES values."""
    values = rating.drop_null().to_numpy()
    if not len(values):
        return {}
    distinct, counts = np.unique(values, return_counts=True)
    if len(distinct) <= HISTOGRAM_VALUES:
        return {f"{v:g}": int(c) for v, c in zip(distinct, counts)}
    counts, edges = np.histogram(values, bins=10)
    return {f"{lo:g}-{hi:g}": int(c) for lo, hi, c in zip(edges[:-1], edges[1:], counts)}


def _titles(log_items: pa.Array, items: pa.Table) -> dict[str, int]:
    """Items of the log missing from the catalog, and those whose catalog title is empty or only its id
    (the importers fill a missing title with the id)."""
    position = pc.index_in(log_items, value_set=items.column("item_id").combine_chunks())
    missing = int(position.null_count)
    titles = pc.take(items.column("title").combine_chunks(), position.drop_null())
    ids = log_items.filter(pc.is_valid(position))
    untitled = pc.or_(pc.equal(pc.utf8_trim_whitespace(titles), ""), pc.equal(titles, ids))
    return {"missing_from_catalog": missing, "title_is_id_or_empty": int(pc.sum(untitled).as_py() or 0)}


def build_profile(examples: pa.Table, items: pa.Table, report: dict, cfg: DataConfig) -> dict:
    """The profile of prepared `examples` (binllm.data.prepare.EXAMPLES) and the catalog; `report` is what
    prepare_examples counted on the way (rows read, dropped, negatives, the rating scale)."""
    split = np.asarray(examples.column("split").to_pylist(), dtype=object)
    label = examples.column("label").to_numpy()
    timestamps = examples.column("timestamp").to_numpy()
    warm = examples.column("warm").to_numpy(zero_copy_only=False)
    users, item_ids = examples.column("user_id").combine_chunks(), examples.column("item_id").combine_chunks()
    splits = {name: _split_profile(split == name, label, timestamps, warm, users, item_ids) for name in SPLITS}
    lengths = pc.list_value_length(examples.column("history")).to_numpy(zero_copy_only=False)
    quantiles = np.percentile(lengths, [0, 25, 50, 75, 100]) if len(lengths) else [0] * 5
    log_items = pc.unique(item_ids)
    after = report.get("after_bad_rows", report.get("read", examples.num_rows))
    duplicates = report.get("duplicates", 0)
    return {
        "rows": {
            "read": report.get("read", examples.num_rows), "kept": examples.num_rows,
            "dropped": {"exact_duplicates": duplicates,
                        "outside_rating_scale": report.get("read", after) - after - duplicates,
                        "outside_split_windows": report.get("outside_split", 0)},
            "negatives_sampled": report.get("negatives", 0), "negatives_short": report.get("negatives_short", 0),
        },
        "feedback": {
            "implicit": report.get("implicit"), "labels_from": report.get("labels_from"),
            "observed_ratings": list(report["observed_ratings"]) if report.get("observed_ratings") else None,
            "rating_scale": list(report["rating_scale"]) if report.get("rating_scale") else None,
            "rating_scale_inferred": report.get("rating_scale_inferred"),
            "min_rating": cfg.min_rating, "suggested_min_rating": report.get("suggested_min_rating"),
            "negatives": {"k": cfg.negatives.k, "sampling": cfg.negatives.sampling, "seed": cfg.negatives.seed},
        },
        "users": len(pc.unique(users)), "items": len(log_items), "catalog_items": items.num_rows,
        "items_without_title": _titles(log_items, items),
        "rating_histogram": rating_histogram(examples.column("rating")),
        "positive_rate": _share(int(label.sum()), len(label)),
        "warm_share": _share(int(warm.sum()), len(warm)),
        "splits": splits,
        "split": describe_split(cfg.split),
        "history_length": {"min": int(quantiles[0]), "p25": float(quantiles[1]), "median": float(quantiles[2]),
                           "p75": float(quantiles[3]), "max": int(quantiles[4]),
                           "empty_share": _share(int((lengths == 0).sum()), len(lengths)), "limit": cfg.history_len},
        "test_unseen_in_train": _unseen_in_train(split, users, item_ids),
    }


def _split_profile(rows: np.ndarray, label: np.ndarray, timestamps: np.ndarray, warm: np.ndarray, users: pa.Array,
                   item_ids: pa.Array) -> dict:
    """Rows, positives, time window, warm share, users and items of one split (`rows`: its mask)."""
    n = int(rows.sum())
    return {
        "rows": n, "positives": int(label[rows].sum()), "positive_rate": _share(int(label[rows].sum()), n),
        "first": iso_date(int(timestamps[rows].min())) if n else None,
        "last": iso_date(int(timestamps[rows].max())) if n else None,
        "warm_share": _share(int(warm[rows].sum()), n),
        "users": len(pc.unique(users.filter(pa.array(rows)))),
        "items": len(pc.unique(item_ids.filter(pa.array(rows)))),
    }


def _unseen_in_train(split: np.ndarray, users: pa.Array, item_ids: pa.Array) -> dict:
    """Shares of the test users, test items and test rows (user or item) that the train split never saw."""
    train, test = pa.array(split == "train"), pa.array(split == "test")
    test_users, test_items = pc.unique(users.filter(test)), pc.unique(item_ids.filter(test))
    unseen_users = pc.invert(pc.is_in(test_users, value_set=pc.unique(users.filter(train))))
    unseen_items = pc.invert(pc.is_in(test_items, value_set=pc.unique(item_ids.filter(train))))
    unseen_rows = pc.or_(pc.invert(pc.is_in(users.filter(test), value_set=pc.unique(users.filter(train)))),
                         pc.invert(pc.is_in(item_ids.filter(test), value_set=pc.unique(item_ids.filter(train)))))
    return {
        "users": _share(int(pc.sum(unseen_users).as_py() or 0), len(test_users)),
        "items": _share(int(pc.sum(unseen_items).as_py() or 0), len(test_items)),
        "rows": _share(int(pc.sum(unseen_rows).as_py() or 0), len(unseen_rows)),
    }


def check_trainable(profile: dict, cfg: DataConfig, source: str, items_source: str) -> None:
    """Refuses, as a DataError naming the key, column or file to change, a prepared data set that cannot
    train: data.min_rating outside the ratings, an implicit log without data.negatives, a positive rate of 0
    or 1, an empty split, a split with one label only, or no item of the log in the catalog."""
    feedback = profile["feedback"]
    implicit = feedback["implicit"]
    observed = feedback["observed_ratings"] if feedback["labels_from"] == "rating" else None
    suggest = feedback["suggested_min_rating"]
    min_rating = f"data.min_rating {cfg.min_rating:g}"
    if observed and not implicit and not observed[0] <= cfg.min_rating <= observed[1]:
        every = "positive" if cfg.min_rating < observed[0] else "negative"
        raise DataError(f"{source}: {min_rating} lies outside the ratings' range [{observed[0]:g}, {observed[1]:g}] "
                        f"(label = rating >= data.min_rating), so every row would be {every}; set data.min_rating "
                        f"inside it, e.g. {suggest:g}")
    if implicit and cfg.negatives.k == 0:
        also = (", or map the feedback column in data.columns.rating or data.columns.label"
                if implicit.startswith("no rating") else "")
        raise DataError(f"{source}: an implicit log (reads or clicks only, no negatives): {implicit}; set "
                        "data.negatives.k (e.g. 4) to sample that many negatives per positive from the items each "
                        f"user never touched{also}")
    why = (f"label = rating >= {min_rating}; the ratings run from {observed[0]:g} to {observed[1]:g}" if observed
           else "labels from column 'label'")
    rate = profile["positive_rate"]
    if rate == 0:
        if observed:
            raise DataError(f"{source}: no row is a positive ({why}); set data.min_rating lower, e.g. {suggest:g}")
        raise DataError(f"{source}: no row is a positive (column 'label' holds 0 on every row); map "
                        "data.columns.label to the column whose 1s are the clicks (or data.columns.rating to ratings)")
    if rate == 1:
        fix = f"set data.min_rating higher, e.g. {suggest:g}, or, " if observed else ""
        raise DataError(f"{source}: every row is a positive ({why}); {fix}for a log of reads or clicks only, set "
                        "data.negatives.k (e.g. 4) to sample negatives from the items each user never touched")
    for name in SPLITS:
        if profile["splits"][name]["rows"] == 0:
            raise DataError(f"examples: split '{name}' is empty ({profile['split']}; {profile['rows']['kept']} rows "
                            "kept); set data.split so that train, valid and test each get rows")
    for name in SPLITS:
        part = profile["splits"][name]
        if part["positives"] in (0, part["rows"]):
            only = 1 if part["positives"] else 0
            fix = "data.min_rating or data.split" if observed else "data.split"
            raise DataError(f"examples: split '{name}' holds label {only} only ({part['rows']} rows, "
                            f"{part['first']} to {part['last']}; {why}); training and validation need both labels "
                            f"in every split: set {fix} so that each split gets both")
    titles = profile["items_without_title"]
    if titles["missing_from_catalog"] == profile["items"]:
        raise DataError(f"{items_source}: none of the log's {profile['items']} items is in the item catalog, so no "
                        "prompt has a title; check that data.columns.item_id names the same ids in both files "
                        "(or point data.items at the catalog of this log)")


def format_profile(profile: dict, where: str = "") -> str:
    """The profile as a short table for the terminal."""
    rows, feedback = profile["rows"], profile["feedback"]
    dropped = rows["dropped"]
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    scale = feedback["rating_scale"]
    if scale is None:
        ratings = "none (labels from column 'label')" if not feedback["implicit"] else f"none ({feedback['implicit']})"
    else:
        given = "inferred" if feedback["rating_scale_inferred"] else "data.rating_scale"
        ratings = (f"scale [{scale[0]:g}, {scale[1]:g}] ({given}),"
                   f" label = rating >= {feedback['min_rating']:g}; "
                   + ", ".join(f"{k}: {v}" for k, v in profile["rating_histogram"].items()))
    hist = profile["history_length"]
    titles = profile["items_without_title"]
    unseen = profile["test_unseen_in_train"]
    lines = [
        f"data profile{f' ({where})' if where else ''}",
        f"  rows      read {rows['read']}, kept {rows['kept']}; dropped: {dropped['exact_duplicates']} exact "
        "duplicates, "
        f"{dropped['outside_rating_scale']} outside data.rating_scale, {dropped['outside_split_windows']} outside the "
        f"split windows; {rows['negatives_sampled']} negatives sampled"
        + (f" ({rows['negatives_short']} short)" if rows["negatives_short"] else ""),
        f"  ids       {profile['users']} users, {profile['items']} items ({profile['catalog_items']} in the catalog; "
        f"{titles['missing_from_catalog']} missing from it, {titles['title_is_id_or_empty']} titled only by their id "
        "or empty)",
        f"  ratings   {ratings}",
        f"  labels    positive rate {pct(profile['positive_rate'])}; warm share {pct(profile['warm_share'])}",
        f"  {'split':<8}{'rows':>10}{'positive':>10}{'warm':>8}{'users':>8}{'items':>8}  window",
    ]
    for name, part in profile["splits"].items():
        lines.append(f"  {name:<8}{part['rows']:>10}{pct(part['positive_rate']):>10}{pct(part['warm_share']):>8}"
                     f"{part['users']:>8}{part['items']:>8}  {part['first'] or '-'} to {part['last'] or '-'}")
    lines += [
        f"  history   length min {hist['min']}, p25 {hist['p25']:g}, median {hist['median']:g}, p75 {hist['p75']:g}, "
        f"max {hist['max']} (data.history_len {hist['limit']}); empty {pct(hist['empty_share'])}",
        f"  test ids unseen in train: users {pct(unseen['users'])}, items {pct(unseen['items'])}; rows with either "
        f"{pct(unseen['rows'])}",
    ]
    return "\n".join(lines)

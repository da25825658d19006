"""The data profile and the checks at prepare (binllm.data.profile), the inferred rating scale, and sampled
negatives for implicit logs (data.negatives), on real tables and through the prepare job."""
import json

import numpy as np
import pyarrow as pa
import pytest

from binllm import cli, storage
from binllm.config import DataConfig, NegativesConfig
from binllm.data import DataError, prepare_examples
from binllm.data.prepare import sample_negatives
from binllm.data.profile import build_profile, check_trainable, format_profile
from binllm.data.schema import normalise_interactions, normalise_items


pytestmark = pytest.mark.usefixtures("restore_logging")  # cli.main configures the root logger

def interactions(users, items, ratings=None, times=None, labels=None):
    t = pa.table({"u": users, "i": items, "t": times if times is not None else list(range(len(users)))})
    rating = pa.chunked_array([pa.array(ratings, pa.float64())]) if ratings is not None else None
    label = pa.chunked_array([pa.array(labels, pa.int8())]) if labels is not None else None
    return normalise_interactions(t["u"], t["i"], rating, label, t["t"], "log.parquet")


def catalog(ids, titles=None):
    ids = pa.chunked_array([pa.array([str(i) for i in ids])])
    titles = pa.chunked_array([pa.array(titles if titles is not None else [f"Title {i}" for i in ids.to_pylist()])])
    return normalise_items(ids, titles, "items.parquet")


def random_log(n=2000, users=40, items=120, low=1, high=10, seed=0):
    rng = np.random.default_rng(seed)
    return interactions([f"u{x}" for x in rng.integers(0, users, n)], [f"i{x}" for x in rng.integers(0, items, n)],
                        rng.integers(low, high + 1, n).astype(float).tolist(), rng.permutation(n).tolist())


def prepared(log, cfg, items=None):
    report = {}
    examples = prepare_examples(log, cfg, source="log.parquet", report=report)
    items = items if items is not None else catalog(sorted(set(log.column("item_id").to_pylist())))
    profile = build_profile(examples, items, report, cfg)
    return examples, profile


def test_profile_figures_of_a_small_log():
    # u1: 4 rows, u2: 3 rows, u3 only in test; ratings 1-5; fractions 0.5/0.25/0.25 over 8 time-ordered rows.
    log = interactions(["u1", "u1", "u2", "u1", "u2", "u1", "u2", "u3"], ["a", "b", "a", "c", "b", "a", "d", "a"],
                       [5, 2, 4, 5, 1, 4, 5, 2], [10, 20, 30, 40, 86400 * 2, 86400 * 3, 86400 * 4, 86400 * 5])
    cfg = DataConfig(history_len=2)
    cfg.split.fractions = [0.5, 0.25, 0.25]
    examples, profile = prepared(log, cfg, catalog(["a", "b", "c", "d", "z"], ["A", "B", "c", "", "Z"]))
    assert profile["rows"] == {"read": 8, "kept": 8, "negatives_sampled": 0, "negatives_short": 0,
                               "dropped": {"exact_duplicates": 0, "outside_rating_scale": 0, "outside_split_windows": 0}}
    assert profile["users"] == 3 and profile["items"] == 4 and profile["catalog_items"] == 5
    assert profile["rating_histogram"] == {"1": 1, "2": 2, "4": 2, "5": 3}
    assert profile["feedback"]["rating_scale"] == [1.0, 5.0] and profile["feedback"]["rating_scale_inferred"]
    assert profile["positive_rate"] == pytest.approx(5 / 8)
    train, valid, test = (profile["splits"][s] for s in ("train", "valid", "test"))
    assert (train["rows"], valid["rows"], test["rows"]) == (4, 2, 2)
    assert (train["positive_rate"], valid["positive_rate"], test["positive_rate"]) == (0.75, 0.5, 0.5)
    assert (train["first"], train["last"], valid["first"], test["last"]) == ("1970-01-01", "1970-01-01", "1970-01-03",
                                                                            "1970-01-06")
    # warm (user and item each with a train row): valid (u2, b) yes, (u1, a) yes; test (u2, d) no, (u3, a) no
    assert valid["warm_share"] == 1.0 and test["warm_share"] == 0.0
    assert profile["test_unseen_in_train"] == {"users": 0.5, "items": 0.5, "rows": 1.0}
    lengths = sorted(len(h) for h in examples.column("history").to_pylist())
    assert lengths == [0, 0, 0, 1, 1, 1, 1, 2]  # at most history_len=2 earlier positives
    assert profile["history_length"] == {"min": 0, "p25": 0.0, "median": 1.0, "p75": 1.0, "max": 2,
                                         "empty_share": 0.375, "limit": 2}
    # c is titled only by its id, d has an empty title; every log item is in the catalog
    assert profile["items_without_title"] == {"missing_from_catalog": 0, "title_is_id_or_empty": 2}
    check_trainable(profile, cfg, "log.parquet", "items.parquet")  # trainable as it is
    table = format_profile(profile, "runs/r/examples/profile.json")
    assert "read 8, kept 8" in table and "scale [1, 5] (inferred)" in table and "valid" in table
    assert json.loads(json.dumps(profile)) == profile  # plain JSON


def test_rating_scale_is_inferred_when_unset_and_a_set_scale_that_drops_rows_is_refused():
    log = random_log(low=1, high=10)
    _, profile = prepared(log, DataConfig())
    assert profile["feedback"]["rating_scale"] == [1.0, 10.0] and profile["rows"]["kept"] == 2000
    with pytest.raises(DataError) as error:
        prepare_examples(log, DataConfig(rating_scale=[1.0, 5.0]), source="log.parquet")
    outside = int((np.asarray(log.column("rating").to_pylist()) > 5).sum())
    assert str(error.value) == (
        f"log.parquet: {outside} of 2000 ratings ({outside / 2000:.1%}) fall outside data.rating_scale [1, 5]; the "
        "ratings run from 1 to 10: set data.rating_scale to [1, 10] (or null: inferred from the ratings), or raise "
        "data.max_out_of_scale (now 0.01) to drop them")
    # -5..99 against the [1, 5] scale names the scale, not the split windows
    weird = random_log(low=-5, high=99)
    with pytest.raises(DataError, match=r"fall outside data.rating_scale \[1, 5\]; the ratings run from -5 to 99"):
        prepare_examples(weird, DataConfig(rating_scale=[1.0, 5.0]), source="log.parquet")
    # a few stray ratings (up to data.max_out_of_scale) are dropped and counted
    stray = pa.concat_tables([random_log(low=1, high=5), interactions(["u1"], ["i1"], [9.0], [5000])])
    _, profile = prepared(stray, DataConfig(rating_scale=[1.0, 5.0]))
    assert profile["rows"]["dropped"]["outside_rating_scale"] == 1 and profile["rows"]["kept"] == 2000


def test_min_rating_outside_the_ratings_is_refused_naming_the_key():
    cfg = DataConfig(min_rating=11.0)
    _, profile = prepared(random_log(low=1, high=10), cfg)
    with pytest.raises(DataError) as error:
        check_trainable(profile, cfg, "log.parquet", "items.parquet")
    assert str(error.value) == ("log.parquet: data.min_rating 11 lies outside the ratings' range [1, 10] (label = "
                                "rating >= data.min_rating), so every row would be negative; set data.min_rating "
                                "inside it, e.g. 8")


@pytest.mark.parametrize("labels, ratings, fragment", [
    ([1] * 300, None, "an implicit log (reads or clicks only, no negatives): column 'label' holds 1 on every row; "
                      "set data.negatives.k"),
    (None, [1.0] * 300, "an implicit log (reads or clicks only, no negatives): every rating is 1; set data.negatives.k"),
    ([0] * 300, None, "no row is a positive (column 'label' holds 0 on every row)"),
    (None, [4.0, 5.0] * 150, "every row is a positive (label = rating >= data.min_rating 4; the ratings run from 4 to 5);"
                             " set data.min_rating higher, e.g. 5"),
])
def test_logs_without_both_labels_are_refused(labels, ratings, fragment):
    rng = np.random.default_rng(1)
    log = interactions([f"u{x}" for x in rng.integers(0, 20, 300)], [f"i{x}" for x in rng.integers(0, 50, 300)],
                       ratings, list(range(300)), labels)
    cfg = DataConfig()
    _, profile = prepared(log, cfg)
    with pytest.raises(DataError) as error:
        check_trainable(profile, cfg, "log.parquet", "items.parquet")
    assert str(error.value).startswith("log.parquet: ") and fragment in str(error.value)


def test_empty_split_one_label_split_and_a_catalog_without_the_log_items_are_refused():
    log = random_log(low=1, high=5)
    cfg = DataConfig()
    cfg.split.fractions = [0.9, 0.1, 0.0]
    _, profile = prepared(log, cfg)
    with pytest.raises(DataError, match=r"^examples: split 'test' is empty \(data.split.fractions \[0.9, 0.1, 0.0\]; "
                                        r"2000 rows kept\); set data.split so that train, valid and test each get rows$"):
        check_trainable(profile, cfg, "log.parquet", "items.parquet")
    # every valid row negative: the valid window holds only 1-3 star ratings
    n = 400
    ratings = np.where((np.arange(n) >= 320) & (np.arange(n) < 360), 2.0, np.tile([1.0, 5.0], n // 2))
    log = interactions([f"u{k % 7}" for k in range(n)], [f"i{k % 31}" for k in range(n)], ratings.tolist(),
                       list(range(n)))
    cfg = DataConfig()
    _, profile = prepared(log, cfg)
    with pytest.raises(DataError) as error:
        check_trainable(profile, cfg, "log.parquet", "items.parquet")
    assert str(error.value) == (
        "examples: split 'valid' holds label 0 only (40 rows, 1970-01-01 to 1970-01-01; label = rating >= "
        "data.min_rating 4; the ratings run from 1 to 5); training and validation need both labels in every split: "
        "set data.min_rating or data.split so that each split gets both")
    _, profile = prepared(random_log(low=1, high=5), DataConfig(), catalog(["x1", "x2"]))
    with pytest.raises(DataError, match=r"^items.parquet: none of the log's 120 items is in the item catalog"):
        check_trainable(profile, DataConfig(), "log.parquet", "items.parquet")
    with pytest.raises(DataError, match=r"items.parquet: column 'title' is empty on every row"):
        catalog(["a", "b"], [None, " "])


def test_negatives_are_untouched_items_at_the_positives_time_seeded_and_counted():
    rng = np.random.default_rng(2)
    n, users, items = 600, 15, 500
    log = interactions([f"u{x}" for x in rng.integers(0, users, n)], [f"i{x}" for x in rng.integers(0, items, n)],
                       None, rng.permutation(n).tolist(), [1] * n)
    cfg = DataConfig(negatives=NegativesConfig(k=2, seed=7), history_len=5)
    examples, profile = prepared(log, cfg)
    check_trainable(profile, cfg, "log.parquet", "items.parquet")
    negatives = examples.filter(pa.compute.equal(examples.column("label"), 0)).to_pandas()
    positives = examples.filter(pa.compute.equal(examples.column("label"), 1)).to_pandas()
    assert profile["rows"]["negatives_sampled"] == len(negatives) == 2 * n - profile["rows"]["negatives_short"]
    assert len(negatives) > 1.9 * n and len(positives) == n
    assert profile["feedback"]["implicit"] == "column 'label' holds 1 on every row"
    touched = set(zip(log.column("user_id").to_pylist(), log.column("item_id").to_pylist()))
    pairs = list(zip(negatives.user_id, negatives.item_id))
    assert not touched & set(pairs) and len(set(pairs)) == len(pairs)  # never touched, each drawn once per user
    assert set(negatives.item_id) <= {f"i{k}" for k in range(items)}
    # each negative shares its positive's user, time and history (it sits just before the positive)
    by_time = {(u, t): list(h) for u, t, h in zip(positives.user_id, positives.timestamp, positives.history)}
    assert all(by_time[(u, t)] == list(h) for u, t, h in zip(negatives.user_id, negatives.timestamp, negatives.history))
    again, _ = prepared(log, cfg)
    assert again.equals(examples)
    other, _ = prepared(log, DataConfig(negatives=NegativesConfig(k=2, seed=8), history_len=5))
    assert not other.equals(examples)


def test_popularity_sampling_follows_item_counts():
    # item p0 has half the rows; users touch few items, so nearly every draw is allowed
    n = 4000
    rng = np.random.default_rng(3)
    items = np.where(rng.random(n) < 0.5, "p0", np.char.add("i", rng.integers(0, 200, n).astype(str)))
    log = interactions([f"u{k}" for k in range(n)], items.tolist(), None, list(range(n)), [1] * n)
    labels = np.ones(n, np.int8)
    def p0_share(sampling):  # among the users who never touched p0 (the others may not draw it)
        owner, drawn = sample_negatives(log, labels, 1, sampling, 0)
        drawn = np.asarray(drawn.to_pylist())
        assert len(owner) == n and not (drawn[items[owner] == "p0"] == "p0").any()
        return np.mean(drawn[items[owner] != "p0"] == "p0")

    assert p0_share("uniform") < 0.02 and 0.45 < p0_share("popularity") < 0.55


def test_prepare_job_writes_the_profile_through_storage(s3_bucket, tmp_path, capsys):
    rng = np.random.default_rng(4)
    n = 500
    storage.write_table(pa.table({"uid": rng.integers(0, 30, n), "iid": rng.integers(0, 80, n),
                                  "ts": rng.permutation(n)}), f"{s3_bucket}/raw/reads.parquet")
    storage.write_table(pa.table({"iid": np.arange(80), "name": [f"Book {k}" for k in range(80)]}),
                        f"{s3_bucket}/raw/books.parquet")
    argv = ["--set", "run.name=byod", "--set", f"run.output_root={s3_bucket}/runs", "--set", "data.format=table",
            "--set", f"data.interactions={s3_bucket}/raw/reads.parquet", "--set", f"data.items={s3_bucket}/raw/books.parquet",
            "--set", "data.columns={user_id: uid, item_id: iid, rating: '', label: '', timestamp: ts, title: name}",
            "--set", "data.negatives={k: 3, sampling: popularity, seed: 1}"]
    cli.main(["prepare", *argv])
    out = capsys.readouterr().out
    profile = storage.read_json(f"{s3_bucket}/runs/byod/examples/profile.json")
    assert profile["rows"]["read"] == n and profile["rows"]["negatives_sampled"] > 2 * n
    assert profile["feedback"]["negatives"] == {"k": 3, "sampling": "popularity", "seed": 1}
    assert storage.read_table(f"{s3_bucket}/runs/byod/examples/examples.parquet").num_rows == profile["rows"]["kept"]
    assert f"data profile ({s3_bucket}/runs/byod/examples/profile.json)" in out and "negatives sampled" in out

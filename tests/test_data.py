import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm.config import ColumnsConfig, DataConfig
from binllm.data import DataError, prepare_examples, read_grouplens, read_recbole, read_table
from binllm.data.prepare import month_index
from binllm.data.schema import as_timestamps, normalise_interactions


def _interactions(users, items, ratings, times):
    t = pa.table({"u": users, "i": items, "r": ratings, "t": times})
    return normalise_interactions(t["u"], t["i"], t["r"], None, t["t"], "test")


def _random_interactions(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return _interactions([f"u{x}" for x in rng.integers(0, 60, n)], rng.integers(0, 200, n).tolist(),
                         rng.integers(1, 6, n).tolist(), rng.integers(0, 500, n).tolist())


def test_history_is_last_n_earlier_positives_oldest_first():
    inter = _interactions(["a"] * 6 + ["b"] * 2, [1, 2, 3, 4, 5, 6, 7, 8], [5, 4, 1, 5, 5, 2, 5, 5],
                          [10, 20, 30, 40, 50, 60, 15, 25])
    cfg = DataConfig(history_len=2)
    cfg.split.fractions = [1.0, 0.0, 0.0]
    ex = prepare_examples(inter, cfg).to_pandas().set_index("item_id")
    assert list(ex.loc["1", "history"]) == []
    assert list(ex.loc["2", "history"]) == ["1"]
    assert list(ex.loc["3", "history"]) == ["1", "2"]
    assert list(ex.loc["6", "history"]) == ["4", "5"]  # last two positives, 3 was a negative
    assert list(ex.loc["8", "history"]) == ["7"]  # other users' items never leak in


def test_history_equals_brute_force_and_never_holds_the_row_or_a_later_one():
    rng = np.random.default_rng(3)
    n = 1500
    inter = _interactions([f"u{x}" for x in rng.integers(0, 40, n)], rng.integers(0, 300, n).tolist(),
                          rng.integers(1, 6, n).tolist(), rng.permutation(n).tolist())
    df = prepare_examples(inter, DataConfig(history_len=10)).to_pandas()
    for user, rows in df.groupby("user_id"):
        rows = rows.sort_values("timestamp")
        for k, row in enumerate(rows.itertuples()):
            earlier = rows.iloc[:k]
            expected = earlier[earlier.label == 1].item_id.tolist()[-10:]
            assert list(row.history) == expected
            assert (earlier.timestamp < row.timestamp).all()


def test_fraction_split_boundaries_follow_time():
    inter = _random_interactions(1000)
    ex = prepare_examples(inter, DataConfig()).to_pandas()
    counts = ex.split.value_counts()
    assert (counts["train"], counts["valid"], counts["test"]) == (800, 100, 100)
    assert ex[ex.split == "train"].timestamp.max() <= ex[ex.split == "valid"].timestamp.min()
    assert ex[ex.split == "valid"].timestamp.max() <= ex[ex.split == "test"].timestamp.min()


def test_month_windows_drop_rows_outside_and_follow_calendar_months():
    def ts(y, m, d=15):
        return int(dt.datetime(y, m, d, tzinfo=dt.timezone.utc).timestamp())
    times = [ts(2000, 4), ts(2000, 5, 1), ts(2000, 6), ts(2000, 7), ts(2000, 8, 31), ts(2000, 9)]
    assert month_index(np.array(times)).tolist() == [0, 1, 2, 3, 4, 5]
    cfg = DataConfig()
    cfg.split.kind = "months"
    cfg.split.train_months, cfg.split.valid_months, cfg.split.test_months = [1, 2], [3, 3], [4, 4]
    ex = prepare_examples(_interactions(["a"] * 6, [1, 2, 3, 4, 5, 6], [5] * 6, times), cfg).to_pandas()
    assert ex.item_id.tolist() == ["2", "3", "4", "5"]
    assert ex.split.tolist() == ["train", "train", "valid", "test"]
    assert list(ex.history.iloc[0]) == []  # the dropped month-0 row gives no history


def test_timestamp_cuts_and_warm_flags():
    inter = _interactions(["a", "b", "a", "c", "b"], [1, 2, 3, 1, 9], [5, 5, 5, 5, 5], [1, 2, 3, 4, 5])
    cfg = DataConfig()
    cfg.split.kind, cfg.split.valid_start, cfg.split.test_start = "timestamps", 3, 4
    ex = prepare_examples(inter, cfg).to_pandas()
    assert ex.split.tolist() == ["train", "train", "valid", "test", "test"]
    assert ex.warm.tolist() == [True, True, False, False, False]  # item 3 unseen; user c unseen; item 9 unseen


def test_grouplens_and_recbole_importers(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t4\t881250949\n2\t20\t2\t881250950\n")
    (tmp_path / "u.item").write_bytes("10|Caf\xe9 (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
                                      "20|Heat (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n".encode("latin-1"))
    inter, items = read_grouplens(tmp_path)
    assert inter.column("rating").to_pylist() == [4.0, 2.0]
    assert items.column("title").to_pylist() == ["Café (1995)", "Heat (1995)"]
    one_m = tmp_path / "ml1m"
    one_m.mkdir()
    (one_m / "ratings.dat").write_text("1::10::5::978300760\n")
    (one_m / "movies.dat").write_text("10::Toy Story (1995)::Animation\n")
    inter, items = read_grouplens(one_m)
    assert inter.column("timestamp").to_pylist() == [978300760] and items.num_rows == 1
    rb = tmp_path / "rb"
    rb.mkdir()
    (rb / "x.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t5.0\n")
    (rb / "x.item").write_text('item_id:token\tmovie_title:token_seq\n10\tSay "Hi"\n')
    inter, items = read_recbole(rb)
    assert inter.column("user_id").to_pylist() == ["1"] and items.column("title").to_pylist() == ['Say "Hi"']


def test_generic_table_importer_with_mapping_and_label(tmp_path):
    pq.write_table(pa.table({"uid": [1, 2], "iid": ["x", "y"], "clicked": [1, 0], "ts": [5, 6]}), tmp_path / "i.parquet")
    (tmp_path / "items.csv").write_text("iid,name\nx,X movie\ny,Y movie\n")
    cols = ColumnsConfig(user_id="uid", item_id="iid", rating="", label="clicked", timestamp="ts", title="name")
    inter, items = read_table(str(tmp_path / "i.parquet"), str(tmp_path / "items.csv"), cols)
    ex = prepare_examples(inter, DataConfig(split=DataConfig().split))
    assert sorted(ex.column("label").to_pylist()) == [0, 1]
    assert items.column("title").to_pylist() == ["X movie", "Y movie"]


def test_bad_inputs_name_file_and_column(tmp_path):
    path = tmp_path / "i.parquet"
    pq.write_table(pa.table({"user": [1], "iid": ["x"], "rating": ["five"], "ts": [5]}), path)
    (tmp_path / "items.csv").write_text("iid,title\nx,X\n")
    with pytest.raises(DataError, match=r"i\.parquet.*missing column.*user_id"):
        read_table(str(path), str(tmp_path / "items.csv"), ColumnsConfig(item_id="iid", timestamp="ts"))
    with pytest.raises(DataError, match=r"i\.parquet.*'rating' must be numeric"):
        read_table(str(path), str(tmp_path / "items.csv"), ColumnsConfig(user_id="user", item_id="iid", timestamp="ts"))
    pq.write_table(pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()),
                             "rating": pa.array([], pa.float64()), "timestamp": pa.array([], pa.int64())}), path)
    with pytest.raises(DataError, match=r"i\.parquet.*empty"):
        read_table(str(path), str(tmp_path / "items.csv"), ColumnsConfig(item_id="item_id"))
    with pytest.raises(DataError, match="no GroupLens"):
        read_grouplens(tmp_path)
    with pytest.raises(DataError, match=r"u\.data: file not found|no GroupLens"):
        read_grouplens(tmp_path / "nowhere")


def test_warm_min_train_counts_train_rows_per_user_and_item():
    # user a: 3 train rows, user b: 1; item 1: 2 train rows, item 2: 2, item 9: 0.
    inter = _interactions(["a", "a", "a", "b", "a", "b"], [1, 2, 1, 2, 2, 9], [5] * 6, [1, 2, 3, 4, 10, 11])
    cfg = DataConfig()
    cfg.split.kind, cfg.split.valid_start, cfg.split.test_start = "timestamps", 5, 10
    assert prepare_examples(inter, cfg).column("warm").to_pylist()[-2:] == [True, False]
    cfg.warm_min_train = 3  # only user a has 3 train rows, and no item has
    assert not any(prepare_examples(inter, cfg).column("warm").to_pylist())
    cfg.warm_min_train = 2
    assert prepare_examples(inter, cfg).column("warm").to_pylist()[-2:] == [True, False]


@pytest.mark.parametrize("scale, unit", [(1, None), (1000, "milliseconds"), (10**6, "microseconds"),
                                         (10**9, "nanoseconds")])
def test_timestamps_in_other_units_are_converted_with_a_note(scale, unit, caplog):
    seconds = np.array([1_600_000_000, 1_600_000_061, 1_700_000_000], dtype=np.int64)
    with caplog.at_level("WARNING"):
        out = as_timestamps(pa.chunked_array([seconds * scale]), "inter.csv", "ts")
    assert out.to_pylist() == seconds.tolist()
    assert (f"holds unix {unit}" in caplog.text) == (unit is not None)
    if unit:
        assert "inter.csv: column 'ts'" in caplog.text


def test_timestamps_that_mix_units_are_refused():
    with pytest.raises(DataError, match="inter.csv: column 'ts' mixes timestamp units \\(seconds, milliseconds"):
        as_timestamps(pa.chunked_array([[1_600_000_000, 1_600_000_000_000]]), "inter.csv", "ts")


def test_duplicates_and_out_of_scale_ratings_are_counted_then_dropped_or_refused(caplog):
    inter = _interactions(["a", "a", "a", "b", "b"], [1, 1, 2, 3, 4], [5, 5, 99, 4, -5], [1, 1, 2, 3, 4])
    cfg = DataConfig(rating_scale=[1.0, 5.0], max_out_of_scale=1.0)  # a set scale; drop any share outside it
    cfg.split.fractions = [1.0, 0.0, 0.0]
    with caplog.at_level("WARNING"):
        examples = prepare_examples(inter, cfg)
    assert examples.num_rows == 2  # one duplicate of (a, 1) and two ratings outside [1, 5] dropped
    assert "1 exact duplicate rows and 2 ratings outside data.rating_scale [1, 5]: dropped" in caplog.text
    cfg.bad_rows = "refuse"
    with pytest.raises(DataError, match=r"1 exact duplicate rows and 2 ratings outside .*'refuse'"):
        prepare_examples(inter, cfg)
    cfg.rating_scale = [-5.0, 100.0]
    with pytest.raises(DataError, match="1 exact duplicate rows and 0 ratings outside"):
        prepare_examples(inter, cfg)

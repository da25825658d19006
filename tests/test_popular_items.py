"""The scoring job's popularity fallback, counted by Ray Data, against the driver-side count it replaced."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from binllm.config import StorageConfig
from binllm.pipeline import run
from binllm.pipeline.inputs import parquet_paths
from binllm.pipeline.pairs import normalise_log, timestamp_seconds
from ray_cluster import local_ray

CUTOFF = 1_000_000


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    with local_ray():
        yield


def driver_side_popular_items(uri: str, history_before: int, n: int) -> list[str]:
    """The implementation before Ray Data: the whole log read on the driver with pyarrow."""
    fs, paths = parquet_paths(uri, "interaction log")
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=["item_id", "timestamp"])
    ts = timestamp_seconds(table.column("timestamp"))
    items = table.column("item_id").cast("string").filter(pc.less(ts, history_before))
    ids, index = np.unique(np.asarray(items.to_pylist(), dtype=object), return_inverse=True)  # sorted ids
    counts = np.bincount(index, minlength=len(ids))
    order = np.lexsort((np.arange(len(ids)), -counts))  # most first, ties by id
    return ids[order][:n].tolist()


@pytest.fixture(scope="module")
def log_folder(tmp_path_factory):
    """Three Parquet files; integer item ids (so "10" sorts before "9"), many tied counts, rows after the cutoff."""
    folder = tmp_path_factory.mktemp("log")
    rng = np.random.default_rng(3)
    for part in range(3):
        n = 200
        pq.write_table(pa.table({
            "user_id": rng.integers(0, 30, n),
            "item_id": rng.integers(0, 40, n),
            "timestamp": rng.integers(CUTOFF - 5000, CUTOFF + 2000, n),
            "label": rng.integers(0, 2, n).astype(np.int8),
        }), folder / f"part-{part}.parquet")
    return folder


def ray_popular_items(folder, history_before, top_k):
    columns = ["user_id", "item_id", "timestamp", "label"]
    log = run._read(str(folder), "interaction log", columns, StorageConfig()).map_batches(
        normalise_log, batch_format="pyarrow", fn_kwargs={"history_before": history_before, "min_rating": 4.0})
    return run._popular_items(log, top_k)


def test_ray_data_popularity_equals_the_driver_side_count(log_folder, monkeypatch):
    expected = driver_side_popular_items(str(log_folder), CUTOFF, 20 + run.POPULAR_EXTRA)
    got = ray_popular_items(log_folder, CUTOFF, top_k=20)
    assert got == expected
    assert len(got) == 40 and "10" in got  # every item seen before the cutoff, ids as strings

    counts = pa.concat_tables([pq.read_table(p) for p in sorted(log_folder.iterdir())])
    before = counts.filter(pc.less(counts["timestamp"], CUTOFF))["item_id"].value_counts().to_pylist()
    by_count = sorted(((-c["counts"], str(c["values"])) for c in before))
    assert [item for _, item in by_count] == got
    assert len({c for c, _ in by_count}) < len(by_count)  # the log has ties, broken by id

    monkeypatch.setattr(run, "POPULAR_EXTRA", 0)
    assert ray_popular_items(log_folder, CUTOFF, top_k=5) == expected[:5]


def test_no_interaction_before_the_cutoff_gives_no_popular_items(log_folder):
    assert ray_popular_items(log_folder, CUTOFF - 10_000, top_k=5) == []
    assert driver_side_popular_items(str(log_folder), CUTOFF - 10_000, 5) == []

"""Storage: URIs to filesystems, Parquet/JSON round trips on disk and on S3 (moto), folder copies with a
node cache, and the publish protocol that replaces a date's data atomically."""
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from binllm import storage
from binllm.config import StorageConfig


def test_filesystem_for_paths_and_uris(tmp_path, monkeypatch):
    fs, path = storage.filesystem_for(tmp_path / "a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    assert storage.filesystem_for(f"file://{tmp_path}/b")[1] == f"{tmp_path}/b"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.filesystem_for("s3://bucket/key/x.parquet")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/key/x.parquet"
    settings = storage.resolve_s3_settings(StorageConfig(endpoint_url="http://h:1", access_key_id="k", secret_access_key="s"))
    assert settings["endpoint_url"] == "http://h:1" and settings["access_key_id"] == "k"
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.filesystem_for("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.filesystem_for("s3://")


def test_s3_round_trips_and_cached_download(s3_bucket, tmp_path):
    table = pa.table({"a": [1, 2, 3]})
    storage.write_table(table, f"{s3_bucket}/t/part.parquet")
    assert storage.read_table(f"{s3_bucket}/t").equals(table)
    with pytest.raises(storage.StorageError, match=r"missing column\(s\) \['b'\]"):
        storage.read_table(f"{s3_bucket}/t", columns=["b"])
    with pytest.raises(storage.StorageError, match="scores not found"):
        storage.read_table(f"{s3_bucket}/nope", what="scores")
    storage.write_json({"x": 1}, f"{s3_bucket}/j/m.json")
    assert storage.read_json(f"{s3_bucket}/j/m.json") == {"x": 1}

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"w" * 5000)
    assert storage.upload_dir(model, f"{s3_bucket}/model") == 2
    assert storage.dir_checksum(f"{s3_bucket}/model") == storage.dir_checksum(str(model))
    cache = tmp_path / "cache"
    local = storage.local_copy(f"{s3_bucket}/model", cache)
    assert (local / "sub" / "w.bin").read_bytes() == b"w" * 5000
    (local / "sub" / "w.bin").write_bytes(b"stale")  # a cached copy is reused while the source is unchanged
    assert storage.local_copy(f"{s3_bucket}/model", cache) == local and (local / "sub" / "w.bin").read_bytes() == b"stale"
    (model / "sub" / "w.bin").write_bytes(b"v" * 6000)
    storage.upload_dir(model, f"{s3_bucket}/model")  # changed source: fetched again
    assert (storage.local_copy(f"{s3_bucket}/model", cache) / "sub" / "w.bin").read_bytes() == b"v" * 6000
    assert storage.local_copy(str(model)) == model  # local folders are used in place
    with pytest.raises(storage.StorageError, match="folder not found"):
        storage.download_dir(f"{s3_bucket}/missing", tmp_path / "x")


def _stage(root, dt, run_id, values):
    storage.write_table(pa.table({"v": values}), f"{storage.run_uri(root, dt, run_id)}/part-0.parquet")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publish_replaces_a_date_and_readers_see_one_copy(where, tmp_path, request):
    root = str(tmp_path / "scores") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/scores"
    _stage(root, "2026-11-26", "r1", [1, 2, 3])
    _stage(root, "2026-11-25", "r0", [9])
    storage.publish_partition(root, "2026-11-25", "r0", {"mode": "requests"})
    m1 = storage.publish_partition(root, "2026-11-26", "r1", {"checksums": {"adapter": "abc"}})
    assert m1["rows"] == 3 and m1["files"] == [{"path": "dt=2026-11-26/run=r1/part-0.parquet", "rows": 3,
                                                 "bytes": m1["files"][0]["bytes"]}]
    assert m1["checksums"] == {"adapter": "abc"}

    # A second run is staged but not yet published: manifest readers still see only r1.
    _stage(root, "2026-11-26", "r2", [4, 5])
    assert storage.read_partition(root, "2026-11-26")["v"].to_pylist() == [1, 2, 3]
    storage.publish_partition(root, "2026-11-26", "r2", {})
    assert storage.read_partition(root, "2026-11-26")["v"].to_pylist() == [4, 5]
    assert storage.read_manifest(root, "2026-11-26")["run_id"] == "r2"
    assert storage.published_dates(root) == ["2026-11-25", "2026-11-26"]

    # Plain hive readers: one run per date, the manifests (underscore names) are not read as data.
    fs, path = storage.filesystem_for(root)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert sorted(zip(table["dt"].to_pylist(), table["run"].to_pylist(), table["v"].to_pylist())) == [
        ("2026-11-25", "r0", 9), ("2026-11-26", "r2", 4), ("2026-11-26", "r2", 5)]
    if where == "local":
        assert json.loads((tmp_path / "scores" / "dt=2026-11-26" / "_manifest.json").read_text())["run_id"] == "r2"
        assert not (tmp_path / "scores" / "dt=2026-11-26" / "run=r1").exists()


def test_publish_checks_names():
    with pytest.raises(storage.StorageError, match="expected YYYY-MM-DD"):
        storage.run_uri("/x", "2026-1-2", "r")
    with pytest.raises(storage.StorageError, match="run id"):
        storage.run_uri("/x", "2026-01-02", "a/b")
    with pytest.raises(storage.StorageError, match="nothing published"):
        storage.read_partition("/nonexistent/root", "2026-01-02")

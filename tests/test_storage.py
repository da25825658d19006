"""Storage: URIs to filesystems, Parquet/JSON round trips on disk and on S3 (moto), folder copies with a
node cache, and the publish protocol that replaces a date's data atomically (binllm.pipeline.publish)."""
import datetime as dt
import json
import os
import pickle
import threading
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from binllm import storage
from binllm.cli import run_recipe
from binllm.config import ConfigError, StorageConfig, load_config
from binllm.pipeline.publish import (RUN_MARKER, RunSuperseded, publish_partition, published_dates, read_manifest,
                                     read_partition, remove_stale_runs, run_uri, start_run)
from binllm.recipes import score
from binllm.train.ray_jobs import ray_storage


def test_filesystem_for_paths_and_uris(tmp_path, monkeypatch):
    fs, path = storage.filesystem_for(tmp_path / "a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    assert storage.filesystem_for(f"file://{tmp_path}/b")[1] == f"{tmp_path}/b"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.filesystem_for("s3://bucket/key/x.parquet")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/key/x.parquet"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    settings = storage.resolve_s3_settings(StorageConfig(endpoint_url="http://h:1"))
    assert settings["endpoint_url"] == "http://h:1" and settings["access_key_id"] == "envkey"
    assert settings["max_attempts"] == StorageConfig().max_attempts == 5
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
    storage.write_table(pa.table({"v": values}), f"{run_uri(root, dt, run_id)}/part-0.parquet")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publish_replaces_a_date_and_readers_see_one_copy(where, tmp_path, request):
    root = str(tmp_path / "scores") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/scores"
    _stage(root, "2026-11-26", "r1", [1, 2, 3])
    _stage(root, "2026-11-25", "r0", [9])
    publish_partition(root, "2026-11-25", "r0", {"mode": "requests"})
    m1 = publish_partition(root, "2026-11-26", "r1", {"checksums": {"adapter": "abc"}})
    assert m1["rows"] == 3 and m1["files"] == [{"path": "dt=2026-11-26/run=r1/part-0.parquet", "rows": 3,
                                                 "bytes": m1["files"][0]["bytes"]}]
    assert m1["checksums"] == {"adapter": "abc"}

    # A second run is staged but not yet published: manifest readers still see only r1.
    _stage(root, "2026-11-26", "r2", [4, 5])
    assert read_partition(root, "2026-11-26")["v"].to_pylist() == [1, 2, 3]
    publish_partition(root, "2026-11-26", "r2", {})
    assert read_partition(root, "2026-11-26")["v"].to_pylist() == [4, 5]
    assert read_manifest(root, "2026-11-26")["run_id"] == "r2"
    assert published_dates(root) == ["2026-11-25", "2026-11-26"]

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
        run_uri("/x", "2026-1-2", "r")
    with pytest.raises(storage.StorageError, match="run id"):
        run_uri("/x", "2026-01-02", "a/b")
    with pytest.raises(storage.StorageError, match="nothing published"):
        read_partition("/nonexistent/root", "2026-01-02")


def test_credentials_travel_to_workers_but_are_never_shown(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    resolved = storage.with_credentials(StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=7))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    worker_copy = pickle.loads(pickle.dumps(resolved))  # a worker without the AWS variables
    assert storage.resolve_s3_settings(worker_copy)["secret_access_key"] == "very-secret"
    assert "very-secret" not in repr(resolved) and "AKIDEXAMPLE" not in repr(resolved)
    fs = pickle.loads(pickle.dumps(storage.s3_filesystem(worker_copy)))
    assert isinstance(fs, storage.RetryingS3FileSystem) and fs._max_attempts == 7  # pyarrow's own pickle drops it
    assert "very-secret" not in repr(fs)


@pytest.mark.reliability(kind="security", what="S3 credentials in the AWS variables; the Ray Train storage filesystem",
                         outcome="its pickle (which Ray Train writes into the run folder) holds no key; it reads S3")
def test_filesystems_of_a_plain_config_pickle_no_credentials(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # moto accepts any secret: make it findable
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTINPICKLES")
    storage.write_json({"x": 1}, f"{s3_bucket}/c/m.json")
    cfg = load_config(None, [f"run.output_root={s3_bucket}/runs"])
    path, fs = ray_storage(cfg.run, cfg.distributed, cfg.storage)
    blob = pickle.dumps(fs)
    assert path == f"{s3_bucket[len('s3://'):]}/runs/ray_train" and b"AKIDNOTINPICKLES" not in blob
    copy = pickle.loads(blob)  # a worker: the SDK's chain finds the variables
    with copy.open_input_stream(f"{s3_bucket[len('s3://'):]}/c/m.json") as stream:
        assert json.loads(stream.read()) == {"x": 1}
    carried = pickle.dumps(storage.s3_filesystem(storage.with_credentials(cfg.storage)))
    assert b"AKIDNOTINPICKLES" in carried  # the scoring job's workers get them explicitly


@pytest.mark.parametrize("key, variable", [("storage.access_key_id", "AWS_ACCESS_KEY_ID"),
                                           ("storage.secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                                           ("storage.session_token", "AWS_SESSION_TOKEN")])
@pytest.mark.reliability(kind="security", what="S3 credentials in a config file or --set",
                         outcome="refused naming the key and the AWS variable to use; the job exits 2")
def test_credentials_in_configs_are_refused(key, variable, tmp_path, capsys):
    message = f"config key '{key}': credentials are not read from configs; set {variable} in the job's environment"
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"{key}=abc"])
    section, name = key.split(".")
    (tmp_path / "c.yaml").write_text(f"{section}:\n  {name}: abc\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(score, ["--config", str(tmp_path / "c.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "abc" not in err and "Traceback" not in err


def _started(root, day, run_id, state="running", hours_ago=0.0):
    storage.write_json({"run_id": run_id, "state": state, "started_at": (
        dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours_ago)).isoformat(timespec="microseconds")},
        f"{run_uri(root, day, run_id)}/{RUN_MARKER}")


def _runs(root, day):
    return sorted(p.name for p in (root / f"dt={day}").iterdir() if p.name.startswith("run="))


def test_publish_order_the_later_started_run_wins(tmp_path):
    root = tmp_path / "scores"
    day = "2026-11-26"
    # B started after A but finished first: A then finds B and is not published.
    for run_id, values in (("a", [1]), ("b", [2, 3])):
        start_run(str(root), day, run_id)
        _stage(str(root), day, run_id, values)
    publish_partition(str(root), day, "b", {})
    with pytest.raises(RunSuperseded, match=r"run a of .* not published: the run b started after it"):
        publish_partition(str(root), day, "a", {})
    assert read_partition(str(root), day)["v"].to_pylist() == [2, 3] and _runs(root, day) == ["run=b"]
    # C started before D and published first: D supersedes it and removes its folder.
    for run_id in ("c", "d"):
        start_run(str(root), day, run_id)
        _stage(str(root), day, run_id, [ord(run_id)])
    publish_partition(str(root), day, "c", {})
    assert read_partition(str(root), day)["v"].to_pylist() == [ord("c")] and _runs(root, day) == ["run=c", "run=d"]
    publish_partition(str(root), day, "d", {})
    assert read_partition(str(root), day)["v"].to_pylist() == [ord("d")] and _runs(root, day) == ["run=d"]
    # An older run still publishing (marker state running) is not deleted under it by the winner.
    _started(str(root), day, "old", hours_ago=1)
    _stage(str(root), day, "old", [0])
    _started(str(root), day, "new")
    _stage(str(root), day, "new", [9])
    publish_partition(str(root), day, "new", {})
    assert _runs(root, day) == ["run=new", "run=old"]


@pytest.mark.reliability(kind="fault", what="two publishers of one date racing, 25 rounds",
                         outcome="the pointer names the later-started run, whose files are all there; one run folder")
def test_concurrent_publishers_end_with_one_consistent_run(tmp_path):
    day = "2026-11-26"
    for round_ in range(25):
        root = str(tmp_path / f"r{round_}")
        for run_id in ("x", "y"):
            start_run(root, day, run_id)
            _stage(root, day, run_id, [round_] * (1 if run_id == "x" else 2))
        gate, outcomes = threading.Barrier(2), {}

        def publish(run_id):
            gate.wait()
            try:
                outcomes[run_id] = publish_partition(root, day, run_id, {})["run_id"]
            except RunSuperseded as exc:
                outcomes[run_id] = exc

        threads = [threading.Thread(target=publish, args=(r,)) for r in ("x", "y")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes["y"] == "y"  # y started last
        assert outcomes["x"] == "x" or isinstance(outcomes["x"], RunSuperseded)
        manifest = read_manifest(root, day)
        assert manifest["run_id"] == "y" and read_partition(root, day)["v"].to_pylist() == [round_] * 2
        assert _runs(tmp_path / f"r{round_}", day) == ["run=y"]


@pytest.mark.reliability(kind="fault", what="unpublished run folders left by killed runs, under several dates",
                         outcome="removed once older than the age limit; live runs and young runs kept")
def test_remove_stale_runs_spares_live_and_young_runs(tmp_path):
    root = str(tmp_path / "scores")
    _stage(root, "2026-11-20", "live", [1])
    publish_partition(root, "2026-11-20", "live", {})
    _started(root, "2026-11-20", "live", state="published", hours_ago=50)  # old but live: kept
    _started(root, "2026-11-21", "killed", hours_ago=30)
    _stage(root, "2026-11-21", "killed", [2])
    _started(root, "2026-11-21", "young", hours_ago=2)
    _stage(root, "2026-11-21", "young", [3])
    _stage(root, "2026-11-22", "unmarked-old", [4])  # an older layout without a marker: its files' age counts
    old = time.time() - 40 * 3600
    for path in (tmp_path / "scores" / "dt=2026-11-22").rglob("*"):
        os.utime(path, (old, old))
    os.utime(tmp_path / "scores" / "dt=2026-11-22" / "run=unmarked-old", (old, old))

    removed = remove_stale_runs(root, 24.0)

    assert sorted(r.rsplit("/", 2)[1:] for r in removed) == [["dt=2026-11-21", "run=killed"],
                                                              ["dt=2026-11-22", "run=unmarked-old"]]
    assert _runs(tmp_path / "scores", "2026-11-20") == ["run=live"]
    assert _runs(tmp_path / "scores", "2026-11-21") == ["run=young"]
    assert read_partition(root, "2026-11-20")["v"].to_pylist() == [1]

"""The Iceberg sink (score.sink: iceberg, binllm.pipeline.iceberg_sink): each run replaces its date in one
snapshot of a table partitioned by dt; a rerun leaves one copy of every pair and the previous snapshot still
holds the old run (time travel); read back with pyiceberg and with DuckDB over the table's data files; a run
whose commit fails commits nothing; on S3 (moto) with a scoring actor killed mid-run, 0 rows lost or doubled."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import logging
import tempfile
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.schema import Schema
from pyiceberg.table.snapshots import Operation
from pyiceberg.types import NestedField, StringType

from binllm import storage
from binllm.config import ConfigError, ScoreConfig, StorageConfig
from binllm.pipeline import run_scoring
from binllm.pipeline.iceberg_sink import IcebergSink, catalog_properties, with_dt
from binllm.pipeline.publish import read_manifest, read_partition
from binllm.recipes.score import scoring_job
from pipeline_helpers import scoring_config, write_inputs
from ray_cluster import local_ray

D1, D2, D3 = "2026-11-25", "2026-11-26", "2026-11-27"
ICEBERG = {"score.sink": "iceberg"}


# --- catalog settings ----------------------------------------------------------------------------------------

def test_catalog_properties_defaults_and_pass_through(tmp_path, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    out = str(tmp_path / "scores")
    props = catalog_properties(ScoreConfig(), out, StorageConfig())
    assert props == {"type": "sql", "uri": f"sqlite:///{out}/iceberg/catalog.db", "warehouse": f"file://{out}/iceberg",
                     "s3.region": "eu-west-1"}
    assert Path(out, "iceberg").is_dir()
    rest = ScoreConfig(iceberg_catalog_uri="https://catalog.example.com/api",
                       iceberg_properties=["warehouse=prod", "s3.endpoint = https://s3.example.com"])
    assert catalog_properties(rest, "s3://bucket/scores", StorageConfig(endpoint_url="http://127.0.0.1:9")) == {
        "type": "rest", "uri": "https://catalog.example.com/api", "warehouse": "prod", "s3.region": "eu-west-1",
        "s3.endpoint": "https://s3.example.com"}  # the property overrides the storage setting


@pytest.mark.reliability(kind="bad input", what="Iceberg sink settings: an S3 output without a catalog URI, a password "
                                                "in the catalog URI, a property without '=', a table name without a "
                                                "namespace, an existing table with other columns",
                         outcome="ConfigError naming the key and what it expects, before any scoring")
def test_bad_iceberg_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'score.iceberg_catalog_uri': required when score.output is "
                                          r"on S3"):
        catalog_properties(ScoreConfig(), "s3://bucket/scores", StorageConfig())
    with pytest.raises(ConfigError, match=r"^config key 'score.iceberg_catalog_uri': holds a password"):
        catalog_properties(ScoreConfig(iceberg_catalog_uri="postgresql://u:hunter2@db/cat"), str(tmp_path), None)
    with pytest.raises(ConfigError, match=r"^config key 'score.iceberg_properties': expected key=value items, got "
                                          r"'s3.endpoint'$"):
        catalog_properties(ScoreConfig(iceberg_properties=["s3.endpoint"]), str(tmp_path), None)
    with pytest.raises(ConfigError, match=r"^config key 'score.iceberg_table': expected namespace.table, got 'scores'$"):
        IcebergSink.open(ScoreConfig(iceberg_table="scores"), str(tmp_path), None)
    catalog = load_catalog("binllm", **catalog_properties(ScoreConfig(), str(tmp_path), None))
    catalog.create_namespace("other")
    catalog.create_table("other.scores", schema=Schema(NestedField(1, "user_id", StringType(), required=False)))
    with pytest.raises(ConfigError, match=r"^config key 'score.iceberg_table': other.scores has columns \['user_id'\] "
                                          r"partitioned by \[\]; expected \['user_id', 'item_id', 'score', 'logit', "
                                          r"'fallback', 'model_version', 'run_id', 'dt'\] partitioned by dt$"):
        IcebergSink.open(ScoreConfig(iceberg_table="other.scores"), str(tmp_path), None)


def stage(sink: IcebergSink, dt: str, run_id: str, n: int) -> str:
    """A run's files in the table's location, as Ray Data leaves them before the commit."""
    uri = sink.data_uri(dt, run_id)
    storage.write_table(with_dt(pa.table({
        "user_id": [f"u{k}" for k in range(n)], "item_id": ["i1"] * n, "score": pa.array([0.5] * n, pa.float32()),
        "logit": pa.array([0.0] * n, pa.float32()), "fallback": [False] * n, "model_version": ["m"] * n,
        "run_id": [run_id] * n}), dt), f"{uri}/part-0.parquet")
    return uri


@pytest.mark.reliability(kind="fault", what="two Iceberg commits of one date at the same moment (8 rounds)",
                         outcome="the catalog refuses the loser, which plans again and replaces the date: one run's "
                                 "rows, never both")
def test_concurrent_commits_of_one_date_leave_one_run(tmp_path, caplog):
    out = str(tmp_path)
    caplog.set_level(logging.INFO, logger="binllm.pipeline.iceberg_sink")
    for round_ in range(8):
        sinks = [IcebergSink.open(ScoreConfig(), out, None) for _ in range(2)]
        uris = [stage(sink, D1, f"r{round_}-{k}", 3 + k) for k, sink in enumerate(sinks)]
        barrier = threading.Barrier(2)
        ids = {}

        def commit(k):
            barrier.wait()
            ids[k] = sinks[k].commit(D1, f"r{round_}-{k}", uris[k], None, {})

        threads = [threading.Thread(target=commit, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(ids) == 2  # both committed (the loser after planning again)
        table = table_of(out)
        rows = table.scan().to_arrow()
        assert len(set(rows["run_id"].to_pylist())) == 1 and rows.num_rows in (3, 4)
        winner = rows["run_id"][0].as_py()
        assert table.current_snapshot().summary["binllm.run_id"] == winner
        assert ids[int(winner[-1])] == table.current_snapshot().snapshot_id
    assert "lost to another writer" in caplog.text  # the race did happen


# --- through the pipeline ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    with local_ray(progress_bars=False):
        yield


def score_date(root, llm_dir, dt, **extra):
    return run_scoring(scoring_job(scoring_config(root, llm_dir, **ICEBERG | {"score.dt": dt} | extra)))


def table_of(out: str):
    return IcebergSink.open(ScoreConfig(), out, None).table


def pairs(table: pa.Table) -> list[tuple]:
    return sorted(zip(*(table[c].to_pylist() for c in ("user_id", "item_id", "score", "fallback"))))


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, tiny_llm_dir):
    """D1 and D2 scored into the default embedded catalog (SQLite and warehouse under the output), then D2 again."""
    root = str(tmp_path_factory.mktemp("iceberg"))
    data = write_inputs(root, tiny_llm_dir)
    first = score_date(root, tiny_llm_dir, D1)
    second = score_date(root, tiny_llm_dir, D2)
    third = score_date(root, tiny_llm_dir, D2)
    return {"root": root, "out": f"{root}/nightly/scores", "requests": data["requests"], "first": first,
            "second": second, "third": third}


def test_a_rerun_replaces_its_date_in_one_snapshot(runs):
    out, first, second, third = runs["out"], runs["first"], runs["second"], runs["third"]
    n = runs["requests"].num_rows
    table = table_of(out)
    rows = table.scan().to_arrow()
    assert rows.num_rows == 2 * n
    for dt, run in ((D1, first), (D2, third)):
        day = rows.filter(pc.equal(rows["dt"], dt))
        assert day.num_rows == n and set(day["run_id"].to_pylist()) == {run.run_id}
        assert len({(u, i) for u, i in zip(day["user_id"].to_pylist(), day["item_id"].to_pylist())}) == \
            len(set(zip(runs["requests"]["user_id"].to_pylist(), runs["requests"]["item_id"].to_pylist())))
    # One snapshot per run: an append, then overwrites; the rerun's deletes the replaced run's files.
    snapshots = table.snapshots()
    assert [s.snapshot_id for s in snapshots] == [first.snapshot_id, second.snapshot_id, third.snapshot_id]
    assert [s.summary.operation for s in snapshots] == [Operation.APPEND, Operation.APPEND, Operation.OVERWRITE]
    assert snapshots[2].parent_snapshot_id == second.snapshot_id
    assert snapshots[2].summary["deleted-records"] == str(n) and snapshots[2].summary["added-records"] == str(n)
    assert snapshots[2].summary["binllm.run_id"] == third.run_id
    # Time travel: the snapshot before the rerun still holds the replaced run's rows.
    before = table.scan(snapshot_id=second.snapshot_id).to_arrow()
    assert before.num_rows == 2 * n
    assert set(before.filter(pc.equal(before["dt"], D2))["run_id"].to_pylist()) == {second.run_id}
    assert pairs(before.filter(pc.equal(before["dt"], D2))) == pairs(rows.filter(pc.equal(rows["dt"], D2)))


def test_duckdb_reads_the_current_data_files(runs):
    table = table_of(runs["out"])
    files = [p.removeprefix("file://") for p in table.inspect.files().column("file_path").to_pylist()]
    assert len(files) >= 2 and all(f"/data/dt={D1}/" in f or f"/data/dt={D2}/run={runs['third'].run_id}/" in f
                                   for f in files)
    got = duckdb.sql(f"SELECT dt, run_id, count(*) AS n, count(DISTINCT user_id || '|' || item_id) AS pairs "
                     f"FROM read_parquet({files!r}, hive_partitioning = false) GROUP BY ALL ORDER BY dt").fetchall()
    n = runs["requests"].num_rows
    distinct = len(set(zip(runs["requests"]["user_id"].to_pylist(), runs["requests"]["item_id"].to_pylist())))
    assert got == [(D1, runs["first"].run_id, n, distinct), (D2, runs["third"].run_id, n, distinct)]
    scores = duckdb.sql(f"SELECT user_id, item_id, score, fallback FROM read_parquet({files!r}, "
                        f"hive_partitioning = false) WHERE dt = '{D2}'").fetchall()
    assert sorted(scores) == pairs(table.scan(row_filter=f"dt = '{D2}'").to_arrow())


def test_the_manifest_records_the_snapshot_and_the_health_report(runs):
    out, first, third = runs["out"], runs["first"], runs["third"]
    manifest = read_manifest(out, D2)
    assert manifest["sink"] == "iceberg" and manifest["run_id"] == third.run_id and manifest["files"] == []
    assert manifest["iceberg"]["snapshot_id"] == third.snapshot_id and manifest["iceberg"]["table"] == "binllm.scores"
    assert manifest["rows"] == runs["requests"].num_rows and manifest["iceberg"]["catalog_type"] == "sql"
    # The drift was read back from the table: the same model on D1 and D2 gives the same scores.
    drift = manifest["health"]["drift"]
    assert (drift["previous_dt"], drift["previous_run_id"], drift["psi"]) == (D1, first.run_id, 0.0)
    assert drift["top_k_overlap"]["mean"] == 1.0
    assert Path(out, manifest["health"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    # The replaced run's folder under the output is gone; its data files stay in the warehouse for time travel.
    assert sorted(p.name for p in Path(out, f"dt={D2}").iterdir()) == ["_manifest.json", f"run={third.run_id}"]
    assert Path(out, "iceberg", "binllm", "scores", "data", f"dt={D2}", f"run={runs['second'].run_id}").is_dir()
    with pytest.raises(storage.StorageError, match=r"committed to the Iceberg table binllm.scores \(snapshot \d+\)"):
        read_partition(out, D2)
    assert "committed snapshot" in third.line() and "PSI 0.0000 vs dt=2026-11-25" in third.line()


@pytest.mark.reliability(kind="fault", what="every Iceberg catalog commit of a scoring run fails (CommitFailedException)",
                         outcome="retried 5 times, then the run fails; no snapshot, its data files and run folder "
                                 "removed, the date's manifest untouched")
def test_a_run_whose_commit_fails_commits_nothing(runs, tiny_llm_dir, monkeypatch):
    out = runs["out"]
    before = [s.snapshot_id for s in table_of(out).snapshots()]
    manifest = read_manifest(out, D2)
    calls = []

    def refuse(self, *args, **kwargs):
        calls.append(1)
        raise CommitFailedException("injected: the table changed")

    monkeypatch.setattr(SqlCatalog, "commit_table", refuse)
    with pytest.raises(CommitFailedException, match="injected"):
        score_date(runs["root"], tiny_llm_dir, D2)
    monkeypatch.undo()
    assert len(calls) == 5
    assert [s.snapshot_id for s in table_of(out).snapshots()] == before and read_manifest(out, D2) == manifest
    warehouse = Path(out, "iceberg", "binllm", "scores", "data", f"dt={D2}")
    assert sorted(p.name for p in warehouse.iterdir()) == sorted(
        [f"run={runs['second'].run_id}", f"run={runs['third'].run_id}"])  # the failed run's files are gone
    assert sorted(p.name for p in Path(out, f"dt={D2}").iterdir()) == ["_manifest.json", f"run={runs['third'].run_id}"]


@pytest.mark.reliability(kind="fault", what="Iceberg sink on S3: a scoring actor's process exits at its 2nd batch",
                         outcome="Ray Data restarts the actor and retries the batch; the table's partition holds "
                                 "exactly the rows of a clean run, 0 lost or doubled")
def test_on_s3_a_killed_actor_loses_and_doubles_nothing(runs, s3_bucket, tiny_llm_dir, tmp_path):
    source = Path(runs["root"])
    for folder in ("examples", "codes", "adapter"):
        storage.upload_dir(source / folder, f"{s3_bucket}/{folder}")
    storage.write_bytes((source / "requests.parquet").read_bytes(), f"{s3_bucket}/requests.parquet")
    summary = score_date(s3_bucket, tiny_llm_dir, D2, **{
        "score.fail_at_batch": 2, "score.iceberg_catalog_uri": f"sqlite:///{tmp_path}/catalog.db",
        "score.iceberg_warehouse": f"{s3_bucket}/warehouse"})
    marker = Path(tempfile.gettempdir()) / "binllm-fault-hooks" / f"scorer-{summary.run_id}"
    assert marker.exists()  # the actor did exit once
    marker.unlink()
    sink = IcebergSink.open(ScoreConfig(iceberg_catalog_uri=f"sqlite:///{tmp_path}/catalog.db"), f"{s3_bucket}/x", None)
    assert sink.table.location().startswith(f"{s3_bucket}/warehouse/")
    files = sink.table.inspect.files().column("file_path").to_pylist()
    assert files and all(f.startswith(f"{s3_bucket}/warehouse/binllm/scores/data/dt={D2}/run={summary.run_id}/")
                         for f in files)
    got = sink.table.scan().to_arrow()
    clean = table_of(runs["out"]).scan(row_filter=f"dt = '{D2}'").to_arrow()
    assert got.num_rows == clean.num_rows == summary.rows_out and pairs(got) == pairs(clean)
    assert read_manifest(f"{s3_bucket}/nightly/scores", D2)["iceberg"]["snapshot_id"] == summary.snapshot_id

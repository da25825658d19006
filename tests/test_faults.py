"""Injected faults on the nightly scoring job: S3 errors, dropped connections and slow answers through a
fault proxy (tests/s3_fault_proxy.py), a scoring actor that dies mid-run, two runs of one date at once,
a killed run's leftovers; and credentials that never reach an output or a log.

Every scoring run here must publish exactly the rows of a clean run: same (user_id, item_id, score)
pairs, none lost, none doubled, and one run folder per date for plain hive readers.
"""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import dataclasses
import datetime as dt
import logging
import tempfile
import threading
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import ray

from binllm import storage
from binllm.cli import run_recipe
from binllm.pipeline.publish import (RUN_MARKER, RunSuperseded, partition_uri, publish_partition, read_manifest,
                                     read_partition, run_uri, start_run)
from binllm.pipeline.run import run_scoring
from binllm.recipes import prepare, score
from binllm.recipes.score import scoring_job
from pipeline_helpers import DT, scoring_config, write_inputs
from ray_cluster import local_ray
from s3_fault_proxy import Fault, FaultProxy

OUT = "nightly/scores"


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    with local_ray(progress_bars=False):
        yield


def new_bucket(endpoint: str) -> str:
    name = f"faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    return f"s3://{name}"


def published_rows(root: str) -> list[tuple[str, str, float]]:
    table = read_partition(f"{root}/{OUT}", DT)
    return sorted(zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), table["score"].to_pylist()))


def hive_runs(root: str) -> tuple[int, set[str]]:
    """What a plain hive reader of the output sees: (rows, run ids)."""
    fs, path = storage.filesystem_for(f"{root}/{OUT}")
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    return table.num_rows, set(table["run"].to_pylist()) if table.num_rows else set()


def stage_leftover(out: str, day: str, run_id: str, started: str | None) -> None:
    """What a run killed after writing data and before publishing leaves: data and its marker."""
    storage.write_table(pa.table({"user_id": ["u1"], "item_id": ["i1"]}),
                        f"{run_uri(out, day, run_id)}/part-0.parquet")
    if started is None:
        start_run(out, day, run_id)
    else:
        storage.write_json({"run_id": run_id, "started_at": started, "state": "running"},
                           f"{run_uri(out, day, run_id)}/{RUN_MARKER}")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_llm_dir):
    """A fault-free run on local disk, the module-wide reference: (rows, root, summary). Its output root
    holds two unpublished leftovers of other dates: one killed 3 hours ago, one of a run still going."""
    root = str(tmp_path_factory.mktemp("clean"))
    data = write_inputs(root, tiny_llm_dir)
    long_ago = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)).isoformat()
    stage_leftover(f"{root}/{OUT}", "2026-11-20", "killed", long_ago)
    stage_leftover(f"{root}/{OUT}", "2026-11-21", "running-now", None)
    summary = run_scoring(scoring_job(scoring_config(root, tiny_llm_dir, **{"score.stale_run_hours": 1.0})))
    rows = published_rows(root)
    assert len(rows) == data["requests"].num_rows == len(set(rows)) == summary.rows_out == 43
    return rows, root, summary


def copy_inputs(clean, root: str) -> None:
    """The clean run's inputs (its LoRA adapter's random init included) under `root`."""
    source = Path(clean[1])
    for folder in ("examples", "codes", "adapter"):
        storage.upload_dir(source / folder, f"{root}/{folder}")
    storage.write_bytes((source / "requests.parquet").read_bytes(), f"{root}/requests.parquet")


@pytest.fixture
def proxy(s3_server, s3_bucket, monkeypatch):
    """A fault proxy in front of the S3 server, the AWS variables pointing at it; no faults yet."""
    with FaultProxy(s3_server) as px:
        monkeypatch.setenv("AWS_ENDPOINT_URL", px.url)
        yield px


def assert_like_clean(root: str, clean_rows: list, run_id: str | None = None) -> None:
    rows = published_rows(root)
    assert len(rows) == len(clean_rows) and len(set(rows)) == len(rows)  # none lost, none doubled
    assert rows == clean_rows
    hive_rows, runs = hive_runs(root)
    assert hive_rows == len(clean_rows) and len(runs) == 1
    assert runs == {read_manifest(f"{root}/{OUT}", DT)["run_id"]}
    if run_id is not None:
        assert runs == {run_id}


# Sparse enough that a run sees a few of each (the AWS standard retry strategy waits up to 1 s, then 2 s ...).
S3_FAULTS = {
    "5xx-reads": Fault("503", method="GET|HEAD", every=25),
    "5xx-writes": Fault("500", method="PUT|POST|DELETE", every=15),
    "dropped-connections": Fault("drop", every=40),
    "slow-responses": Fault("delay", every=20, delay_s=0.3),
}


@pytest.mark.parametrize("kind", [
    pytest.param("5xx-reads", marks=pytest.mark.reliability(
        kind="fault", what="S3 answers every 25th GET/HEAD with 503 SlowDown",
        outcome="reads retried; files, folders and the published partition identical to the originals")),
    pytest.param("5xx-writes", marks=pytest.mark.reliability(
        kind="fault", what="S3 answers every 15th PUT/POST/DELETE with 500 InternalError",
        outcome="writes retried; files, folders and the published partition identical to the originals")),
    pytest.param("dropped-connections", marks=pytest.mark.reliability(
        kind="fault", what="every 40th S3 connection closed without an answer",
        outcome="requests retried; files, folders and the published partition identical to the originals")),
    pytest.param("slow-responses", marks=pytest.mark.reliability(
        kind="fault", what="every 20th S3 answer delayed 0.3 s",
        outcome="storage waits; files, folders and the published partition identical to the originals")),
])
def test_storage_reads_and_writes_survive_transient_s3_faults(kind, proxy, s3_bucket, tmp_path):
    fault = proxy.add(dataclasses.replace(S3_FAULTS[kind]))
    table = pa.table({"user_id": [f"u{k}" for k in range(500)], "score": [k / 500 for k in range(500)]})
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 40)

    storage.write_table(table, f"{s3_bucket}/t/part-0.parquet")
    assert storage.read_table(f"{s3_bucket}/t").equals(table)
    storage.write_json({"k": [1, 2]}, f"{s3_bucket}/j/small.json")
    assert storage.read_json(f"{s3_bucket}/j/small.json") == {"k": [1, 2]}
    assert storage.upload_dir(folder, f"{s3_bucket}/adapter", last=("adapter_config.json",)) == 2
    assert storage.dir_checksum(f"{s3_bucket}/adapter") == storage.dir_checksum(str(folder))
    copy = storage.download_dir(f"{s3_bucket}/adapter", tmp_path / "copy")
    assert (copy / "sub" / "w.bin").read_bytes() == (folder / "sub" / "w.bin").read_bytes()
    out = f"{s3_bucket}/scores"
    for run_id in ("r1", "r2"):
        start_run(out, DT, run_id)
        storage.write_table(table, f"{run_uri(out, DT, run_id)}/part-0.parquet")
        publish_partition(out, DT, run_id, {"mode": "requests"})
    assert read_partition(out, DT, columns=["user_id", "score"]).equals(table)
    assert read_manifest(out, DT)["run_id"] == "r2"
    assert [i.path.rsplit("/", 2)[1] for i in storage.list_files(out)] == ["run=r2"]
    assert fault.injected >= 3, proxy.log  # the faults did happen


@pytest.mark.reliability(kind="fault", what="5xx on reads and writes, dropped connections and slow answers "
                                            "during a scoring run on S3",
                         outcome="retried; output identical to a clean run, 0 rows lost or doubled")
def test_scoring_job_survives_mixed_transient_s3_faults(proxy, s3_bucket, tiny_llm_dir, clean):
    copy_inputs(clean, s3_bucket)
    faults = {kind: proxy.add(dataclasses.replace(f)) for kind, f in S3_FAULTS.items()}
    summary = run_scoring(scoring_job(scoring_config(s3_bucket, tiny_llm_dir)))
    assert {kind: f.injected > 0 for kind, f in faults.items()} == dict.fromkeys(S3_FAULTS, True), proxy.log
    assert summary.rows_out == len(clean[0])
    assert_like_clean(s3_bucket, clean[0], summary.run_id)


@pytest.mark.reliability(kind="fault", what="a scoring actor's process exits at its 2nd batch",
                         outcome="Ray Data restarts the actor and retries the batch; output identical to a clean run")
def test_scoring_actor_killed_mid_run_recovers(s3_bucket, tiny_llm_dir, clean):
    copy_inputs(clean, s3_bucket)
    cfg = scoring_config(s3_bucket, tiny_llm_dir, **{"score.fail_at_batch": 2})
    summary = run_scoring(scoring_job(cfg))
    marker = Path(tempfile.gettempdir()) / "binllm-fault-hooks" / f"scorer-{summary.run_id}"
    assert marker.exists()  # the actor did exit once
    marker.unlink()
    assert summary.rows_out == len(clean[0])
    assert_like_clean(s3_bucket, clean[0], summary.run_id)


@pytest.mark.reliability(kind="fault", what="two scoring runs of one date started at once",
                         outcome="the later-started run is published, the other superseded; one complete run on disk")
def test_two_runs_of_one_date_at_once_leave_one_complete_run(s3_bucket, tiny_llm_dir, clean):
    copy_inputs(clean, s3_bucket)
    cfg = scoring_config(s3_bucket, tiny_llm_dir)
    results: dict[int, object] = {}

    def one(k):
        try:
            results[k] = run_scoring(scoring_job(cfg))
        except BaseException as exc:  # noqa: BLE001 - the test inspects what each run ended with
            results[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=500)
    assert len(results) == 2
    published = [r for r in results.values() if not isinstance(r, BaseException)]
    failed = [r for r in results.values() if isinstance(r, BaseException)]
    assert published, failed
    for exc in failed:  # a loser that saw the newer run before publishing fails with a clear message
        assert isinstance(exc, RunSuperseded) and "started after it and was published" in str(exc)
    manifest = read_manifest(f"{s3_bucket}/{OUT}", DT)
    # The winner is the run that started last, whichever finished first.
    starts = {r.run_id: r.manifest["started_at"] for r in published}
    assert manifest["run_id"] == max(starts, key=starts.get)
    assert manifest["rows"] == len(clean[0])
    assert_like_clean(s3_bucket, clean[0], manifest["run_id"])
    fs, part = storage.filesystem_for(partition_uri(f"{s3_bucket}/{OUT}", DT))
    folders = [i.path.rsplit("/", 1)[1] for i in fs.get_file_info(pafs.FileSelector(part)) if
               i.type == pafs.FileType.Directory]
    assert folders == [f"run={manifest['run_id']}"]


@pytest.mark.reliability(kind="fault", what="a killed run left an unpublished run= folder under another date",
                         outcome="the next run of any date removes it once older than score.stale_run_hours")
def test_killed_runs_leftovers_are_removed_by_the_next_run_of_any_date(clean):
    rows, root, summary = clean
    out = f"{root}/{OUT}"
    assert not Path(run_uri(out, "2026-11-20", "killed")).exists()
    assert Path(run_uri(out, "2026-11-21", "running-now"), "part-0.parquet").exists()  # too young
    assert sorted(p.name for p in Path(out, f"dt={DT}").iterdir()) == ["_manifest.json", f"run={summary.run_id}"]
    assert sorted(p.name for p in Path(out, f"dt={DT}", f"run={summary.run_id}").iterdir() if p.suffix != ".parquet") \
        == ["_health.png", "_manifest.json", "_run.json"]
    assert storage.read_json(f"{out}/dt={DT}/run={summary.run_id}/_run.json")["state"] == "published"


KEY_ID, SECRET = "AKIAFAULTSTESTKEY123", "sEcReT/faults+test+" + "q" * 21


@pytest.mark.reliability(kind="security", what="S3 credentials in the AWS variables; prepare and score on S3",
                         outcome="no output file, manifest or log holds the key id or the secret")
def test_credentials_never_reach_outputs_or_logs(proxy, s3_bucket, tiny_llm_dir, monkeypatch, caplog, capfd, tmp_path):
    root_logger = logging.getLogger()
    # run_recipe's setup_logging replaces the root handlers (pytest's included): restored afterwards.
    monkeypatch.setattr(root_logger, "handlers", list(root_logger.handlers))
    monkeypatch.setattr(root_logger, "level", root_logger.level)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.chdir(tmp_path)  # no ./ray_config.yaml: the defaults plus --set
    caplog.set_level(logging.DEBUG)
    data = write_inputs(s3_bucket, tiny_llm_dir)
    raw = data["examples"].select(["user_id", "item_id", "timestamp", "label"])
    storage.write_table(raw, f"{s3_bucket}/raw/interactions.parquet")
    storage.write_table(data["items"], f"{s3_bucket}/raw/items.parquet")
    common = [f"run.output_root={s3_bucket}/prep", "run.name=secure"]

    run_recipe(prepare, ["--set", *common[:1], "--set", common[1], "--set", "data.format=table",
                         "--set", f"data.interactions={s3_bucket}/raw/interactions.parquet",
                         "--set", f"data.items={s3_bucket}/raw/items.parquet", "--set", "data.columns.label=label",
                         "--set", "data.columns.rating="])
    cfg_args = [f"{k}={v}" for k, v in {
        "run.output_root": s3_bucket, "run.name": "nightly", "llm.model": tiny_llm_dir, "llm.dtype": "float32",
        "data.examples": f"{s3_bucket}/prep/secure/examples", "encoder.codes": f"{s3_bucket}/codes",
        "tune.adapter": f"{s3_bucket}/adapter", "score.requests": f"{s3_bucket}/requests.parquet", "score.dt": DT,
        "score.num_actors": 1, "score.cpus_per_actor": 0.5, "score.partitions": 1, "score.batch_size": 16,
        "data.history_len": 5}.items()]
    summary = run_recipe(score, [a for kv in cfg_args for a in ("--set", kv)])
    assert summary.rows_out == data["requests"].num_rows
    assert storage.read_table(f"{s3_bucket}/prep/secure/examples/examples.parquet").num_rows > 0
    assert sum(1 for _, path, _ in proxy.log if "/nightly/scores/" in path) > 0  # the job went through S3

    # Every object in the bucket, read directly from the server (no credentials involved).
    s3 = boto3.client("s3", endpoint_url=proxy.upstream, region_name="us-east-1")
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("_manifest.json") for k in keys) and any(k.endswith(".parquet") for k in keys)
    blobs = {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    out, err = capfd.readouterr()
    blobs["<stdout>"], blobs["<stderr>"] = out.encode(), err.encode()
    blobs["<log records>"] = "\n".join(r.getMessage() for r in caplog.records).encode()
    session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in session.rglob("*"):
        if path.is_file():
            blobs[str(path)] = path.read_bytes()
    assert "scored 43 pairs" in out and len(blobs) > len(keys) + 3
    for secret in (KEY_ID, SECRET):
        leaks = [name for name, blob in blobs.items() if secret.encode() in blob]
        assert leaks == [], f"{secret[:4]}... found in {leaks}"

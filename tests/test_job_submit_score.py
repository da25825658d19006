"""`ray job submit` of jobs.score to a real local Ray head: candidate generation, local output read by DuckDB."""
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from binllm import storage
from binllm.pipeline.publish import read_manifest
from ray_cluster import submit_job
from pipeline_helpers import DT, UNCODED_USERS, brute_force_top_k, seen_items, write_inputs

REPO = Path(__file__).resolve().parents[1]
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "GLOO_SOCKET_IFNAME": "lo"}


def test_ray_job_submit_scores_candidates(ray_head, tmp_path, tiny_llm_dir):
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = str(tmp_path)
    data = write_inputs(root, tiny_llm_dir)
    storage.write_table(pa.table({"user_id": ["u0", "u1", "u10", "nobody"]}), f"{root}/active.parquet")
    overrides = {
        "run.output_root": root, "run.name": "nightly", "llm.model": str(tiny_llm_dir), "llm.dtype": "float32",
        "data.examples": f"{root}/examples", "encoder.codes": f"{root}/codes", "tune.adapter": f"{root}/adapter",
        "data.history_len": 5, "score.users": f"{root}/active.parquet", "score.top_k": 4, "score.dt": DT,
        "score.num_actors": 1, "score.cpus_per_actor": 0.5, "score.partitions": 1, "score.batch_size": 16,
    }
    entrypoint = " ".join([sys.executable, "-m", "jobs.score"] + [f"--set {k}={v}" for k, v in overrides.items()])
    client = JobSubmissionClient(ray_head)
    runtime_env = {"working_dir": str(REPO), "excludes": ["runs", ".cache"], "env_vars": RAY_ENV}
    job = submit_job(client, entrypoint=entrypoint, runtime_env=runtime_env)
    deadline = time.time() + 300
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "scored 16 pairs" in logs

    out = f"{root}/nightly/scores"
    rows = duckdb.sql(f"select user_id, item_id, score, fallback, dt, run from read_parquet('{out}/*/*/*.parquet', "
                      "hive_partitioning=1)").fetchall()
    manifest = read_manifest(out, DT)
    assert len(rows) == manifest["rows"] == 4 * 4
    assert all(0.0 <= r[2] <= 1.0 for r in rows) and {str(r[4]) for r in rows} == {DT}
    assert {r[5] for r in rows} == {manifest["run_id"]}
    seen = seen_items(data["examples"])
    by_user = {}
    for user, item, *_ in rows:
        assert item not in seen.get(user, set())
        by_user.setdefault(user, set()).add(item)
    for user in ("u0", "u1"):
        assert by_user[user] == brute_force_top_k(root, user, seen[user], 4)
    # Users without a code still get (popular, unseen) candidates, scored with the text-only prompt.
    assert {r[0] for r in rows if r[3]} == UNCODED_USERS & {"u10"} | {"nobody"}
    assert len(by_user["nobody"]) == 4

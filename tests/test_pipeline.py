"""The Ray Data scoring pipeline end to end on a tiny LLM: S3 storage via moto, explicit requests, reruns; and
no configuration hangs it: every actor pool size finishes or is refused, and a stalled run fails naming the stage."""
import json
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import logging
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray

from binllm import storage
from binllm.cli import run_recipe
from binllm.config import ConfigError
from binllm.pipeline import InputError, run_scoring
from binllm.pipeline.pairs import user_histories
from binllm.pipeline.publish import published_dates, read_manifest, read_partition
from binllm.recipes import score
from binllm.recipes.score import scoring_job
from pipeline_helpers import DT, expected_logits, histories_before, scoring_config, write_inputs
from ray_cluster import local_ray


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    with local_ray(progress_bars=False):
        yield


@ray.remote
class Blocker:
    """Holds CPUs of the cluster, as other work would."""

    def ping(self) -> int:
        return 1


def test_requests_on_s3_match_direct_scoring_and_rerun_replaces(s3_bucket, tiny_llm_dir, tmp_path):
    data = write_inputs(s3_bucket, tiny_llm_dir)
    cfg = scoring_config(s3_bucket, tiny_llm_dir)
    first = run_scoring(scoring_job(cfg))
    out = f"{s3_bucket}/nightly/scores"
    assert first.rows_in == data["requests"].num_rows == first.rows_out
    table = read_partition(out, DT)
    assert table.num_rows == data["requests"].num_rows
    assert set(table.column_names) >= {"user_id", "item_id", "score", "logit", "fallback", "model_version", "run_id"}
    assert table.schema.field("score").type == pa.float32() and table.schema.field("logit").type == pa.float32()

    # Same pairs scored directly, histories rebuilt by hand (every example is before 2026-11-26).
    hist = histories_before(data["examples"], 2**62, 5)
    got = {(u, i): (s, l, f) for u, i, s, l, f in zip(*(table[c].to_pylist() for c in
                                                          ("user_id", "item_id", "score", "logit", "fallback")))}
    req = data["requests"]
    rows = req.append_column("history", pa.array([hist.get(u, []) for u in req["user_id"].to_pylist()],
                                                  pa.list_(pa.string())))
    logits, fallback = expected_logits(cfg, rows, data["items"], s3_bucket)
    for (u, i), want, fb in zip(zip(req["user_id"].to_pylist(), req["item_id"].to_pylist()), logits, fallback):
        score, logit, got_fb = got[(u, i)]
        assert logit == pytest.approx(float(want), abs=1e-5)
        assert score == pytest.approx(1 / (1 + np.exp(-float(want))), abs=1e-6)
        assert got_fb == bool(fb)
    assert got[("u10", "i3")][2] and got[("u2", "i29")][2] and got[("stranger", "i4")][2]
    assert first.fallbacks == int(np.sum(fallback)) > 0

    manifest = read_manifest(out, DT)
    assert manifest["run_id"] == first.run_id and manifest["rows"] == req.num_rows
    assert manifest["checksums"]["adapter"] == storage.dir_checksum(f"{s3_bucket}/adapter")
    assert manifest["inputs"]["requests"] == f"{s3_bucket}/requests.parquet"
    assert "secret_access_key" not in manifest["config"]["storage"] and "testing" not in json.dumps(manifest)
    assert manifest["code_version"] and [f["rows"] for f in manifest["files"]] and manifest["summary"]["fallbacks"] > 0
    # The health report: the run's score distribution; no earlier date, so no drift; the PNG beside the data on S3.
    assert manifest["health"]["scores"]["rows"] == req.num_rows and manifest["health"]["drift"]["psi"] is None
    assert manifest["health"]["scores"]["quantiles"]["p50"] == pytest.approx(float(np.median(table["score"])), abs=1e-6)
    assert storage.exists(f"{out}/{manifest['health']['plot']}")

    second = run_scoring(scoring_job(cfg))
    assert second.run_id != first.run_id
    again = read_partition(out, DT)
    assert again.num_rows == req.num_rows and set(again["run_id"].to_pylist()) == {second.run_id}
    # A rerun compares with the previous DATE (there is none), never with the run of the same date it replaces.
    assert second.manifest["health"]["drift"]["previous_dt"] is None
    # An independent hive reader sees exactly one copy: the old run's folder is gone.
    fs, path = storage.filesystem_for(out)
    hive = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert hive.num_rows == req.num_rows
    assert set(hive["run"].to_pylist()) == {second.run_id}
    np.testing.assert_allclose(np.sort(hive["logit"].to_numpy()), np.sort(table["logit"].to_numpy()), atol=1e-6)


def test_bad_inputs_name_file_and_column(tmp_path, tiny_llm_dir):
    root = str(tmp_path)
    write_inputs(root, tiny_llm_dir)
    storage.write_table(pa.table({"user": ["u1"], "item_id": ["i1"]}), f"{root}/bad.parquet")
    with pytest.raises(InputError, match=r"scoring requests .*bad.parquet: missing column\(s\) \['user_id'\]"):
        run_scoring(scoring_job(scoring_config(root, tiny_llm_dir, **{"score.requests": f"{root}/bad.parquet"})))
    with pytest.raises(InputError, match=r"interaction log not found: .*nowhere.parquet"):
        run_scoring(scoring_job(scoring_config(root, tiny_llm_dir,
                                               **{"score.interactions": f"{root}/nowhere.parquet"})))
    storage.write_table(pa.table({"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string())}),
                        f"{root}/empty.parquet")
    with pytest.raises(InputError, match="nothing to score"):
        run_scoring(scoring_job(scoring_config(root, tiny_llm_dir, **{"score.requests": f"{root}/empty.parquet"})))
    assert published_dates(f"{root}/nightly/scores") == []
    assert not storage.exists(f"{root}/nightly/scores/dt={DT}") or not storage.list_files(f"{root}/nightly/scores")


def test_user_histories_keep_last_positives_oldest_first():
    log = pa.table({
        "user_id": ["a", "a", "b", "a", "a", "b"],
        "item_id": ["x", "y", "z", "w", "v", "q"],
        "timestamp": [4, 1, 5, 3, 2, 6],
        "positive": [True, True, False, True, False, True],
    })
    users, hist = user_histories(log, 2)
    assert dict(zip(users.to_pylist(), hist.to_pylist())) == {"a": ["w", "x"], "b": ["q"]}


# --- no configuration can hang the nightly job (issue 18) ------------------------------------------------------

@pytest.fixture(scope="module")
def pool_root(tmp_path_factory, tiny_llm_dir):
    root = str(tmp_path_factory.mktemp("pool"))
    data = write_inputs(root, tiny_llm_dir)
    return root, data


@pytest.mark.parametrize("num_actors, cpus_per_actor, finishes", [
    (1, 1.0, True),    # 1 CPU for the actor, 1 for the read and join tasks
    (2, 1.0, False),   # the pool would hold both CPUs: the read tasks would never start
    (3, 1.0, False),   # more than the cluster
])
def test_every_pool_size_finishes_or_is_refused(num_actors, cpus_per_actor, finishes, pool_root, tiny_llm_dir):
    """On the 2-CPU local Ray: every pool size from 1 to the cluster's CPUs and one above either scores every
    request or is refused before any work, naming the keys and what to set (none waits for a CPU forever:
    score.stall_timeout_s bounds a run that would)."""
    root, data = pool_root
    cfg = scoring_config(root, tiny_llm_dir, **{"score.num_actors": num_actors, "score.cpus_per_actor": cpus_per_actor,
                                                "score.partitions": num_actors, "score.stall_timeout_s": 300,
                                                "run.name": f"pool{num_actors}x{cpus_per_actor:g}"})
    out = f"{root}/{cfg.run.name}/scores"
    if finishes:
        summary = run_scoring(scoring_job(cfg))
        assert summary.rows_out == data["requests"].num_rows
        assert read_partition(out, DT).num_rows == data["requests"].num_rows
        return
    with pytest.raises(ConfigError) as refused:
        run_scoring(scoring_job(cfg))
    assert str(refused.value).startswith(
        f"config keys 'score.num_actors' ({num_actors}) x 'score.cpus_per_actor' ({cpus_per_actor:g}) ask for "
        f"{num_actors * cpus_per_actor:g} CPUs for the scoring actors; the Ray cluster has 2 CPUs and the read and join "
        "tasks need 1 besides the actors, so the pipeline would never finish: set score.num_actors to 1 or less")
    assert not storage.exists(out)


@pytest.mark.reliability(kind="fault", what="scoring on a cluster whose CPUs are all held by other work (no task can start)",
                         outcome="fails after score.stall_timeout_s naming the stalled stage; exit 2, one line; nothing "
                                 "written")
def test_a_stalled_pipeline_fails_naming_the_stage(pool_root, tiny_llm_dir, tmp_path, capsys, monkeypatch):
    root_logger = logging.getLogger()
    # run_recipe's setup_logging replaces the root handlers (pytest's included): restored afterwards.
    monkeypatch.setattr(root_logger, "handlers", list(root_logger.handlers))
    monkeypatch.setattr(root_logger, "level", root_logger.level)
    root, _ = pool_root
    out = tmp_path / "out"
    settings = {"run.output_root": out, "run.name": "stalled", "llm.model": tiny_llm_dir, "llm.dtype": "float32",
                "data.examples": f"{root}/examples", "encoder.codes": f"{root}/codes", "tune.adapter": f"{root}/adapter",
                "score.requests": f"{root}/requests.parquet", "score.dt": DT, "score.num_actors": 1,
                "score.cpus_per_actor": 0.5, "score.partitions": 1, "score.stall_timeout_s": 3}
    blocker = Blocker.options(num_cpus=2).remote()  # the whole cluster: the pool check passes, no task can start
    ray.get(blocker.ping.remote())
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_recipe(score, [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")])
    finally:
        ray.kill(blocker)
    assert exit_info.value.code == 2 and time.monotonic() - started < 60
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        r"error: score: the scoring pipeline made no progress for \d+ s \(score.stall_timeout_s 3\); stalled at stage "
        r"'[^']+' \(\d+ tasks submitted, 0 finished\); the Ray cluster has 0 of 2 CPUs and 0 of 0 GPUs free; check "
        r"score.num_actors, score.cpus_per_actor and score.gpus_per_actor against what the cluster can give, or raise "
        r"score.stall_timeout_s \(0: off\)", errors[0]), errors[0]
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_a_joined_cluster_is_asked_to_grow_before_the_pool_is_refused(pool_root, tiny_llm_dir, monkeypatch, caplog):
    """Under `ray job submit` (RAY_ADDRESS) the cluster may autoscale from zero workers: the pool is requested
    from its autoscaler and refused only when it has not grown within score.stall_timeout_s."""
    root, _ = pool_root
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    cfg = scoring_config(root, tiny_llm_dir, **{"score.num_actors": 3, "score.cpus_per_actor": 1.0,
                                                "score.stall_timeout_s": 2, "run.name": "joined"})
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(ConfigError) as refused:
        run_scoring(scoring_job(cfg))
    assert 2 <= time.monotonic() - started < 30
    assert "asked its autoscaler, waiting up to 2 s" in caplog.text
    assert str(refused.value).endswith("set score.num_actors to 1 or less (or score.cpus_per_actor to 0.333 or less) "
                                       "(waited 2 s for the cluster to grow: score.stall_timeout_s)")
    assert not storage.exists(f"{root}/joined")

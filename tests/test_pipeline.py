"""The Ray Data scoring pipeline end to end on a tiny LLM: S3 storage via moto, explicit requests, reruns."""
import json
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from binllm import storage
from binllm.pipeline import InputError, run_scoring
from binllm.pipeline.pairs import user_histories
from pipeline_helpers import DT, expected_logits, histories_before, scoring_config, write_inputs
from ray_cluster import local_ray


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    with local_ray(progress_bars=False):
        yield


def test_requests_on_s3_match_direct_scoring_and_rerun_replaces(s3_bucket, tiny_llm_dir, tmp_path):
    data = write_inputs(s3_bucket, tiny_llm_dir)
    cfg = scoring_config(s3_bucket, tiny_llm_dir)
    first = run_scoring(cfg)
    out = f"{s3_bucket}/nightly/scores"
    assert first.rows_in == data["requests"].num_rows == first.rows_out
    table = storage.read_partition(out, DT)
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

    manifest = storage.read_manifest(out, DT)
    assert manifest["run_id"] == first.run_id and manifest["rows"] == req.num_rows
    assert manifest["checksums"]["adapter"] == storage.dir_checksum(f"{s3_bucket}/adapter")
    assert manifest["inputs"]["requests"] == f"{s3_bucket}/requests.parquet"
    assert "secret_access_key" not in manifest["config"]["storage"] and "testing" not in json.dumps(manifest)
    assert manifest["code_version"] and [f["rows"] for f in manifest["files"]] and manifest["summary"]["fallbacks"] > 0

    second = run_scoring(cfg)
    assert second.run_id != first.run_id
    again = storage.read_partition(out, DT)
    assert again.num_rows == req.num_rows and set(again["run_id"].to_pylist()) == {second.run_id}
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
        run_scoring(scoring_config(root, tiny_llm_dir, **{"score.requests": f"{root}/bad.parquet"}))
    with pytest.raises(InputError, match=r"interaction log not found: .*nowhere.parquet"):
        run_scoring(scoring_config(root, tiny_llm_dir, **{"score.interactions": f"{root}/nowhere.parquet"}))
    storage.write_table(pa.table({"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string())}),
                        f"{root}/empty.parquet")
    with pytest.raises(InputError, match="nothing to score"):
        run_scoring(scoring_config(root, tiny_llm_dir, **{"score.requests": f"{root}/empty.parquet"}))
    assert storage.published_dates(f"{root}/nightly/scores") == []
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

"""The demo job end to end: synthetic interactions with planted structure, the tiny LLM, real files."""
import math
import os
import shutil

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm import evaluation
from binllm.config import load_config
from binllm.metrics import format_report
from binllm.recipes import demo, evaluate
from ray_cluster import local_ray
from synthetic import make_planted_examples


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """The demo's closing nightly-scoring step joins this module's Ray (binllm.ray_env.init_ray reuses it)."""
    with local_ray():
        yield


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_llm_dir):
    root = tmp_path_factory.mktemp("demo")
    examples, items = make_planted_examples(n_users=120, n_items=80, n_rows=6000, seed=7)
    pq.write_table(examples.select(["user_id", "item_id", "label", "timestamp"]), root / "interactions.parquet")
    pq.write_table(items, root / "items.parquet")
    cfg = load_config("ray_config.yaml", [
        "run.name=e2e", f"run.output_root={root / 'runs'}",
        "data.format=table", f"data.interactions={root / 'interactions.parquet'}", f"data.items={root / 'items.parquet'}",
        "data.columns.rating=", "data.columns.label=label",
        f"llm.model={tiny_llm_dir}",
        "demo.max_train_rows=64", "demo.max_valid_rows=32", "demo.max_test_rows=50", "demo.score_users=3",
        "score.top_k=4",
        "tune.stage1.micro_batch_size=16", "tune.stage2.micro_batch_size=16",
        "demo.blend=true", "tune.lora.top_layers=1", "tune.cache_trunk=true", "score.autocast=bfloat16",
    ])
    table = demo.main(cfg)
    return cfg, table


def test_demo_writes_scores_and_metrics(demo_run):
    cfg, table = demo_run
    run_dir = cfg.run_dir()
    scores = pq.read_table(f"{run_dir}/eval/test_scores.parquet")
    assert scores.schema.names == ["user_id", "item_id", "timestamp", "label", "warm", "method", "logit", "score"]
    assert scores.schema.field("logit").type == pa.float32()
    assert scores.num_rows == 4 * 50
    assert sorted(set(scores.column("method").to_pylist())) == ["BinLLM", "BinMF", "Blend", "MF"]
    probs = scores.column("score").to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    metrics = pq.read_table(f"{run_dir}/eval/metrics.parquet").to_pylist()
    assert [m["method"] for m in metrics] == ["MF", "BinMF", "BinLLM", "Blend"]
    assert all(m["all_rows"] == 50 for m in metrics)
    for name in ("codes/users.parquet", "codes/items.parquet", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "examples/examples.parquet", "eval/metrics.md", "eval/valid_auc.png",
                 "eval/blend.json", "eval/pairs.parquet"):
        assert (pa.fs.LocalFileSystem().get_file_info(f"{run_dir}/{name}").type == pa.fs.FileType.File), name


def test_binmf_learns_the_planted_structure(demo_run):
    _, table = demo_run
    by_method = {row["method"]: row for row in table.to_pylist()}
    assert by_method["BinMF"]["all_auc"] > 0.75
    assert by_method["MF"]["all_auc"] > 0.75
    assert not math.isnan(by_method["BinLLM"]["all_auc"])


def test_the_demo_table_is_the_metrics_of_its_test_scores(demo_run):
    cfg, table = demo_run
    assert table.column_names == ["method", "all_auc", "all_uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc",
                                  "all_rows", "warm_rows", "cold_rows", "all_uauc_users", "warm_uauc_users",
                                  "cold_uauc_users", "all_log_loss", "all_ece"]
    recomputed = evaluation.metrics_table(pq.read_table(f"{cfg.run_dir()}/eval/test_scores.parquet"))
    assert recomputed.column("all_auc").to_pylist() == table.column("all_auc").to_pylist()
    assert pq.read_table(f"{cfg.run_dir()}/eval/metrics.parquet").column("all_uauc").to_pylist() == \
        table.column("all_uauc").to_pylist()
    for row in table.to_pylist():
        assert row["warm_rows"] + row["cold_rows"] == row["all_rows"] == 50
        assert 0.0 <= row["all_auc"] <= 1.0 and 0.0 <= row["all_uauc"] <= 1.0
    assert format_report(table) in open(f"{cfg.run_dir()}/eval/metrics.md").read()


def test_demo_blend_is_fitted_on_the_tuning_validation_rows(demo_run):
    """The Blend row reuses stage 2's validation rows (tune.stage2.max_valid_rows, seeded run.seed + 1) and the
    kept adapter's scores of them: its standardisation is BinMF's logits of exactly those rows."""
    import json

    import numpy as np

    from binllm.data import split_rows
    from binllm.encoder import load_encoder, score_pairs

    cfg, _ = demo_run
    blend = json.loads(open(f"{cfg.run_dir()}/eval/blend.json").read())
    examples = pq.read_table(f"{cfg.run_dir()}/examples/examples.parquet")
    valid = split_rows(examples, "valid", cfg.tune.stage2.max_valid_rows, cfg.run.seed + 1)
    assert blend["names"] == ["BinMF", "BinLLM"] and blend["fitted_on"]["rows"] == valid.num_rows > 100
    assert blend["fitted_on"]["of"].startswith("stage2")
    binmf = score_pairs(load_encoder(f"{cfg.run_dir()}/encoder"), valid["user_id"], valid["item_id"])
    assert blend["mean"][0] == pytest.approx(float(np.mean(binmf.astype(np.float64))), abs=1e-6)
    assert blend["std"][0] == pytest.approx(float(np.std(binmf.astype(np.float64))), abs=1e-6)


def test_demo_ends_with_a_published_nightly_scoring_run(demo_run):
    from binllm.pipeline.publish import published_dates, read_manifest, read_partition

    cfg, _ = demo_run
    root = f"{cfg.run_dir()}/scores"
    (dt,) = published_dates(root)
    scores = read_partition(root, dt)
    assert scores.num_rows == 3 * 4  # score_users x top_k candidates
    assert set(scores.column("user_id").to_pylist()) <= set(pq.read_table(
        f"{cfg.run_dir()}/demo_active_users.parquet").column("user_id").to_pylist())
    probs = scores.column("score").to_numpy()
    assert ((probs > 0) & (probs < 1)).all()
    assert read_manifest(root, dt)["rows"] == 12


def test_evaluate_job_scores_the_test_split_from_the_run_artifacts(demo_run, tmp_path):
    import dataclasses

    import numpy as np


    cfg, _ = demo_run
    demo_scores = pq.read_table(f"{cfg.run_dir()}/eval/test_scores.parquet")
    # A copy of the run without its test scores: the module's demo run stays as the other tests read it.
    copy_root = tmp_path / "runs"
    shutil.copytree(cfg.run_dir(), copy_root / cfg.run.name, ignore=shutil.ignore_patterns("test_scores.parquet"))
    same_sample = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_root=str(copy_root)),
                                      eval=dataclasses.replace(cfg.eval, max_test_rows=50))
    path = f"{same_sample.run_dir()}/eval/test_scores.parquet"
    table = evaluate.main(same_sample)
    rows = {r["method"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["BinLLM", "BinMF", "MF"] and all(r["all_rows"] == 50 for r in rows.values())
    scores = pq.read_table(path)
    assert scores.num_rows == 3 * 50

    def logits(table, method):
        return table.filter(pa.compute.equal(table["method"], method))["logit"].to_numpy()

    # the saved encoder and adapter, loaded back, score exactly as the in-process models did
    np.testing.assert_allclose(logits(scores, "BinMF"), logits(demo_scores, "BinMF"), atol=1e-6)
    np.testing.assert_allclose(logits(scores, "BinLLM"), logits(demo_scores, "BinLLM"), atol=1e-4)

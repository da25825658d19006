"""Evaluate: AUC / UAUC of every method on the test split, overall and warm/cold.

Scores the test split (at most eval.max_test_rows, a seeded sample) with MF (trained here: seconds),
BinMF (the run's encoder) and BinLLM (the base LLM + the run's adapter) into
<run dir>/eval/test_scores.parquet (long format: user_id, item_id, timestamp, label, warm, method,
logit, score) unless that file exists already (the demo writes it), then writes
<run dir>/eval/metrics.parquet and metrics.md and prints the table.

    binllm evaluate --config ray_config.yaml --set run.name=<run id>
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm import prompt_spec, sources, storage
from binllm.config import Config
from binllm.data import split_rows
from binllm.metrics import evaluate_scores, format_report, report_table, sigmoid
from binllm.prompts import build_prompts

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "score", "eval")
SCORES_COLUMNS = ["user_id", "item_id", "label", "warm", "method", "logit"]


def eval_uri(cfg: Config) -> str:
    return storage.join_uri(cfg.run_dir(), "eval")


def test_scores_uri(cfg: Config) -> str:
    return storage.join_uri(eval_uri(cfg), "test_scores.parquet")


def long_scores(rows: pa.Table, method: str, logits: np.ndarray) -> pa.Table:
    logits = np.asarray(logits, dtype=np.float32)
    return pa.table({
        "user_id": rows.column("user_id"), "item_id": rows.column("item_id"), "timestamp": rows.column("timestamp"),
        "label": rows.column("label"), "warm": rows.column("warm"),
        "method": pa.array([method] * rows.num_rows, type=pa.string()),
        "logit": pa.array(logits),
        "score": pa.array(sigmoid(logits)),
    })


def score_test_rows(cfg: Config, test: pa.Table, items: pa.Table, user_codes: pa.Table, item_codes: pa.Table, *,
                    mf, binmf, llm, tokenizer) -> tuple[pa.Table, int]:
    """Long-format scores of MF, BinMF and BinLLM on `test`, and how many rows took the text-only fallback."""
    from binllm.encoder import score_pairs
    from binllm.llm import answer_tokens, score_prompts

    prompts = build_prompts(test, items, user_codes, item_codes, cfg.prompt, tokenizer=tokenizer)
    answer = answer_tokens(tokenizer, prompts.texts[0], cfg.llm.answer, cfg.llm.negative_answer)
    llm_logits = score_prompts(llm, tokenizer, prompts.prefix, prompts.suffix, answer_id=answer,
                               shared_prefix=cfg.score.shared_prefix, max_batch_tokens=cfg.score.max_batch_tokens)
    users, item_ids = test.column("user_id"), test.column("item_id")
    scores = pa.concat_tables([
        long_scores(test, "MF", score_pairs(mf, users, item_ids)),
        long_scores(test, "BinMF", score_pairs(binmf, users, item_ids)),
        long_scores(test, "BinLLM", llm_logits),
    ])
    return scores, int(prompts.fallback.sum())


def compute_test_scores(cfg: Config) -> pa.Table:
    """Scores the run's test split with every method from the run's artifacts (see the module docstring)."""
    from binllm.encoder import load_encoder, train_encoder
    from binllm.llm import load_adapter

    adapter_uri = sources.adapter_uri(cfg)
    prompt_spec.check_adapter(adapter_uri, cfg)
    examples, items = sources.read_examples(cfg)
    user_codes, item_codes = sources.read_code_tables(cfg)
    fs, encoder_path = storage.filesystem_for(sources.encoder_uri(cfg), cfg.storage)
    binmf = load_encoder(encoder_path, filesystem=fs)
    mf = train_encoder(examples, cfg.encoder, kind="mf", seed=cfg.run.seed)
    model, tokenizer = sources.load_base_model(cfg)
    adapter = storage.local_copy(adapter_uri, storage_cfg=cfg.storage)
    llm = load_adapter(model, adapter)
    test = split_rows(examples, "test", cfg.eval.max_test_rows, cfg.run.seed)
    log.info("scoring %d test rows with MF, BinMF and BinLLM", test.num_rows)
    scores, fallbacks = score_test_rows(cfg, test, items, user_codes, item_codes, mf=mf, binmf=binmf, llm=llm,
                                        tokenizer=tokenizer)
    log.info("%d of %d rows took the text-only prompt (user or item without a code)", fallbacks, test.num_rows)
    storage.write_table(scores, test_scores_uri(cfg), cfg.storage)
    return scores


def metrics_table(scores: pa.Table) -> pa.Table:
    """One row per method, in the order methods first appear."""
    missing = [c for c in SCORES_COLUMNS if c not in scores.column_names]
    if missing:
        raise ValueError(f"test scores: missing column(s) {missing}; expected {SCORES_COLUMNS}")
    methods = list(dict.fromkeys(scores.column("method").to_pylist()))
    results = {}
    for method in methods:
        rows = scores.filter(pc.equal(scores.column("method"), method))
        results[method] = evaluate_scores(rows, rows.column("logit").to_numpy(zero_copy_only=False).astype(np.float64))
    return report_table(results)


def write_report(cfg: Config, scores: pa.Table) -> tuple[pa.Table, str]:
    table = metrics_table(scores)
    text = format_report(table)
    uri = eval_uri(cfg)
    storage.write_table(table, storage.join_uri(uri, "metrics.parquet"), cfg.storage)
    storage.write_bytes(f"```\n{text}\n```\n".encode(), storage.join_uri(uri, "metrics.md"), cfg.storage)
    return table, text


def setup(cfg: Config) -> None:
    return None


def run(cfg: Config, _: None = None) -> pa.Table:
    uri = test_scores_uri(cfg)
    if storage.exists(uri, cfg.storage):
        return storage.read_table(uri, cfg.storage, what="test scores")
    return compute_test_scores(cfg)


def publish(cfg: Config, scores: pa.Table) -> pa.Table:
    table, text = write_report(cfg, scores)
    print(text)
    return table


def main(cfg: Config) -> pa.Table:
    return publish(cfg, run(cfg, setup(cfg)))

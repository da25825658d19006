"""Test-split evaluation shared by the evaluate, demo and paper-table recipes: every method's scores of the
same rows in long format, the Blend row, and the report (per-method metrics and the paired AUC differences).

Scores table (long format): user_id, item_id, timestamp, label, warm, method, logit, score.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm import storage
from binllm.blend import Blend, fit_blend
from binllm.config import LLMConfig, PromptConfig, ScoreConfig, StorageConfig
from binllm.encoder import score_pairs
from binllm.llm import answer_tokens, autocast_dtype, score_prompts
from binllm.metrics import (N_BOOT, REPORT_PAIRS, evaluate_scores, format_pairs, format_report, match_pairs,
                            pairwise_report, report_table, sigmoid)
from binllm.prompts import build_prompts

SCORES_COLUMNS = ["user_id", "item_id", "label", "warm", "method", "logit"]
ROW_KEYS = ("user_id", "item_id", "timestamp", "label")  # a test row, as far as the scores table has them
BLEND = "Blend"
BLENDED = ("BinMF", "BinLLM")


def eval_uri(run_dir: str) -> str:
    return storage.join_uri(run_dir, "eval")


def test_scores_uri(run_dir: str) -> str:
    return storage.join_uri(eval_uri(run_dir), "test_scores.parquet")


def long_scores(rows: pa.Table, method: str, logits: np.ndarray) -> pa.Table:
    logits = np.asarray(logits, dtype=np.float32)
    return pa.table({
        "user_id": rows.column("user_id"), "item_id": rows.column("item_id"), "timestamp": rows.column("timestamp"),
        "label": rows.column("label"), "warm": rows.column("warm"),
        "method": pa.array([method] * rows.num_rows, type=pa.string()),
        "logit": pa.array(logits),
        "score": pa.array(sigmoid(logits)),
    })


def llm_logits(rows: pa.Table, items: pa.Table, user_codes: pa.Table | None, item_codes: pa.Table | None, *,
               prompt: PromptConfig, llm: LLMConfig, score: ScoreConfig, model, tokenizer) -> tuple[np.ndarray, int]:
    """The tuned LLM's click logits of `rows` (score.* batching and autocast), and how many rows took the
    text-only fallback."""
    prompts = build_prompts(rows, items, user_codes, item_codes, prompt, tokenizer=tokenizer)
    answer = answer_tokens(tokenizer, prompts.texts[0], llm.answer, llm.negative_answer)
    logits = score_prompts(model, tokenizer, prompts.prefix, prompts.suffix, answer_id=answer,
                           shared_prefix=score.shared_prefix, max_batch_tokens=score.max_batch_tokens,
                           autocast=autocast_dtype(score.autocast, next(model.parameters()).device))
    return logits, int(prompts.fallback.sum())


def score_test_rows(test: pa.Table, items: pa.Table, user_codes: pa.Table, item_codes: pa.Table, *,
                    prompt: PromptConfig, llm: LLMConfig, score: ScoreConfig, mf, binmf, model,
                    tokenizer) -> tuple[pa.Table, int]:
    """Long-format scores of MF, BinMF and BinLLM on `test`, and how many rows took the text-only fallback."""
    logits, fallbacks = llm_logits(test, items, user_codes, item_codes, prompt=prompt, llm=llm, score=score,
                                   model=model, tokenizer=tokenizer)
    users, item_ids = test.column("user_id"), test.column("item_id")
    scores = pa.concat_tables([
        long_scores(test, "MF", score_pairs(mf, users, item_ids)),
        long_scores(test, "BinMF", score_pairs(binmf, users, item_ids)),
        long_scores(test, "BinLLM", logits),
    ])
    return scores, fallbacks


def method_logits(scores: pa.Table, method: str) -> np.ndarray:
    rows = scores.filter(pc.equal(scores.column("method"), method))
    if rows.num_rows == 0:
        raise ValueError(f"scores: no rows of method {method!r}")
    return rows.column("logit").to_numpy(zero_copy_only=False).astype(np.float64)


def blend_fit_scores(rows: pa.Table, binmf, binllm_logits: np.ndarray | None) -> pa.Table:
    """BinMF's and BinLLM's logits of validation `rows` in long format, for add_blend; `binllm_logits` are the
    tuned model's, in row order (TuneResult.valid_scores: the kept adapter's scores, no second forward pass)."""
    if binllm_logits is None:
        raise ValueError("blend: tuning returned no validation scores (its last stage was resumed as finished); "
                         "score the validation rows with llm_logits instead")
    if len(binllm_logits) != rows.num_rows:
        raise ValueError(f"blend: {len(binllm_logits)} BinLLM validation logits for {rows.num_rows} validation rows")
    binmf_logits = score_pairs(binmf, rows.column("user_id"), rows.column("item_id"))
    return pa.concat_tables([long_scores(rows, "BinMF", binmf_logits), long_scores(rows, "BinLLM", binllm_logits)])


def add_blend(valid_scores: pa.Table, test_scores: pa.Table) -> tuple[pa.Table, Blend]:
    """`test_scores` with a "Blend" method: a logistic regression on BinMF's and BinLLM's logits fitted on
    `valid_scores` (validation rows, long format), applied to the test rows. Beyond the paper: the BinLLM row
    is still BinLLM alone."""
    features = lambda scores: np.column_stack([method_logits(scores, m) for m in BLENDED])
    labels = valid_scores.filter(pc.equal(valid_scores.column("method"), BLENDED[0])).column("label")
    blend = fit_blend(features(valid_scores), labels.to_numpy(zero_copy_only=False), names=BLENDED)
    test = test_scores.filter(pc.equal(test_scores.column("method"), BLENDED[0]))
    return pa.concat_tables([test_scores, long_scores(test, BLEND, blend.logits(features(test_scores)))]), blend


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


def pairs_table(scores: pa.Table, seed: int, n_boot: int = N_BOOT) -> pa.Table:
    """`pairwise_report` of REPORT_PAIRS among the methods of `scores`; the methods paired must have scored the
    same test rows in the same order as the first of them in `scores` (ValueError naming the first that did not)."""
    methods = list(dict.fromkeys(scores.column("method").to_pylist()))
    pairs = match_pairs(REPORT_PAIRS, methods)
    paired = [m for m in methods if any(m in pair for pair in pairs)]  # the first one is the reference
    keys = [c for c in ROW_KEYS if c in scores.column_names]
    by_method, reference, labels = {}, None, None
    for method in paired:
        rows = scores.filter(pc.equal(scores.column("method"), method))
        rows_keys = rows.select(keys)
        if reference is None:
            reference, labels = (method, rows_keys), rows.column("label").to_numpy(zero_copy_only=False)
        elif not rows_keys.equals(reference[1]):
            raise ValueError(f"test scores: method {method!r} did not score the same rows in the same order "
                             f"({', '.join(keys)}) as {reference[0]!r}; AUC differences need the same rows")
        by_method[method] = rows.column("logit").to_numpy(zero_copy_only=False).astype(np.float64)
    return pairwise_report(by_method, labels if labels is not None else np.zeros(0, np.int8), pairs, n_boot, seed)


def write_report(scores: pa.Table, run_dir: str, seed: int, storage_cfg: StorageConfig) -> tuple[pa.Table, str]:
    """metrics.parquet, pairs.parquet and metrics.md under <run dir>/eval/; the metrics table and the report text."""
    table = metrics_table(scores)
    pairs = pairs_table(scores, seed)
    text = "\n\n".join(t for t in (format_report(table), format_pairs(pairs)) if t)
    uri = eval_uri(run_dir)
    storage.write_table(table, storage.join_uri(uri, "metrics.parquet"), storage_cfg)
    storage.write_table(pairs, storage.join_uri(uri, "pairs.parquet"), storage_cfg)
    storage.write_bytes(f"```\n{text}\n```\n".encode(), storage.join_uri(uri, "metrics.md"), storage_cfg)
    return table, text

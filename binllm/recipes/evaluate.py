"""Evaluate: AUC / UAUC of every method on the test split, overall and warm/cold.

Scores the test split (at most eval.max_test_rows, a seeded sample) with MF (trained here: seconds),
BinMF (the run's encoder) and BinLLM (the base LLM + the run's adapter) into
<run dir>/eval/test_scores.parquet (long format: user_id, item_id, timestamp, label, warm, method,
logit, score) unless that file exists already (the demo writes it), then writes
<run dir>/eval/metrics.parquet and metrics.md and prints the table: per method AUC / UAUC (and the users
UAUC covers) overall, warm and cold, log loss and ECE; then, for the pairs the paper orders (BinLLM - BinMF,
...), the AUC difference on the same rows with its paired-bootstrap 95% interval (<run dir>/eval/pairs.parquet).

    binllm evaluate --config ray_config.yaml --set run.name=<run id>
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm import prompt_spec, sources, storage
from binllm.blend import Blend, fit_blend
from binllm.config import Config
from binllm.data import split_rows
from binllm.metrics import (N_BOOT, REPORT_PAIRS, evaluate_scores, format_pairs, format_report, match_pairs,
                            pairwise_report, report_table, sigmoid)
from binllm.prompts import build_prompts

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "score", "eval")
SCORES_COLUMNS = ["user_id", "item_id", "label", "warm", "method", "logit"]
ROW_KEYS = ("user_id", "item_id", "timestamp", "label")  # a test row, as far as the scores table has them


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
    from binllm.llm import answer_tokens, autocast_dtype, score_prompts

    prompts = build_prompts(test, items, user_codes, item_codes, cfg.prompt, tokenizer=tokenizer)
    answer = answer_tokens(tokenizer, prompts.texts[0], cfg.llm.answer, cfg.llm.negative_answer)
    llm_logits = score_prompts(llm, tokenizer, prompts.prefix, prompts.suffix, answer_id=answer,
                               shared_prefix=cfg.score.shared_prefix, max_batch_tokens=cfg.score.max_batch_tokens,
                               autocast=autocast_dtype(cfg.score.autocast))
    users, item_ids = test.column("user_id"), test.column("item_id")
    scores = pa.concat_tables([
        long_scores(test, "MF", score_pairs(mf, users, item_ids)),
        long_scores(test, "BinMF", score_pairs(binmf, users, item_ids)),
        long_scores(test, "BinLLM", llm_logits),
    ])
    return scores, int(prompts.fallback.sum())


BLEND = "Blend"
BLENDED = ("BinMF", "BinLLM")


def method_logits(scores: pa.Table, method: str) -> np.ndarray:
    rows = scores.filter(pc.equal(scores.column("method"), method))
    if rows.num_rows == 0:
        raise ValueError(f"scores: no rows of method {method!r}")
    return rows.column("logit").to_numpy(zero_copy_only=False).astype(np.float64)


def add_blend(valid_scores: pa.Table, test_scores: pa.Table) -> tuple[pa.Table, Blend]:
    """`test_scores` with a "Blend" method: a logistic regression on BinMF's and BinLLM's logits fitted on
    `valid_scores` (validation rows, long format), applied to the test rows. Beyond the paper: the BinLLM row
    is still BinLLM alone."""
    features = lambda scores: np.column_stack([method_logits(scores, m) for m in BLENDED])
    labels = valid_scores.filter(pc.equal(valid_scores.column("method"), BLENDED[0])).column("label")
    blend = fit_blend(features(valid_scores), labels.to_numpy(zero_copy_only=False), names=BLENDED)
    test = test_scores.filter(pc.equal(test_scores.column("method"), BLENDED[0]))
    return pa.concat_tables([test_scores, long_scores(test, BLEND, blend.logits(features(test_scores)))]), blend


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


def write_report(cfg: Config, scores: pa.Table) -> tuple[pa.Table, str]:
    """metrics.parquet, pairs.parquet and metrics.md under <run dir>/eval/; the metrics table and the report text."""
    table = metrics_table(scores)
    pairs = pairs_table(scores, cfg.run.seed)
    text = "\n\n".join(t for t in (format_report(table), format_pairs(pairs)) if t)
    uri = eval_uri(cfg)
    storage.write_table(table, storage.join_uri(uri, "metrics.parquet"), cfg.storage)
    storage.write_table(pairs, storage.join_uri(uri, "pairs.parquet"), cfg.storage)
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

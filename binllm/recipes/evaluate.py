"""Evaluate: AUC / UAUC of every method on the test split, overall and warm/cold.

Scores the test split (at most eval.max_test_rows, a seeded sample) with MF (trained here: seconds),
BinMF (the run's encoder) and BinLLM (the base LLM + the run's adapter) into
<run dir>/eval/test_scores.parquet (long format: user_id, item_id, timestamp, label, warm, method,
logit, score) unless that file exists already (the demo writes it), then writes
<run dir>/eval/metrics.parquet and metrics.md and prints the table: per method AUC / UAUC (and the users
UAUC covers) overall, warm and cold, log loss and ECE; then, for the pairs the paper orders (BinLLM - BinMF,
...), the AUC difference on the same rows with its paired-bootstrap 95% interval (<run dir>/eval/pairs.parquet).
The MLflow run `<run.name>-evaluate` (binllm.tracking) holds the config, each method's metrics as
test/<method>/<metric> and metrics.md.

    binllm evaluate --config ray_config.yaml --set run.name=<run id>
"""
from __future__ import annotations

import logging

import pyarrow as pa

from binllm import prompt_spec, sources, storage, tracking
from binllm.config import Config, ConfigError
from binllm.data import split_rows
from binllm.encoder import load_encoder, train_encoder
from binllm.evaluation import eval_uri, score_test_rows, test_scores_uri, write_report
from binllm.llm import load_adapter

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "score", "eval", "tracking")


def compute_test_scores(cfg: Config) -> pa.Table:
    """Scores the run's test split with every method from the run's artifacts (see the module docstring); the
    adapter's prompt spec is checked by the caller."""
    layout = cfg.layout()
    examples, items = sources.read_examples(layout)
    user_codes, item_codes = sources.read_code_tables(layout)
    fs, encoder_path = storage.filesystem_for(layout.encoder, cfg.storage)
    binmf = load_encoder(encoder_path, filesystem=fs)
    mf = train_encoder(examples, cfg.encoder, kind="mf", seed=cfg.run.seed)
    model, tokenizer = sources.load_base_model(cfg.llm, cfg.storage)
    llm = load_adapter(model, storage.local_copy(layout.adapter, storage_cfg=cfg.storage))
    test = split_rows(examples, "test", cfg.eval.max_test_rows, cfg.run.seed)
    log.info("scoring %d test rows with MF, BinMF and BinLLM", test.num_rows)
    scores, fallbacks = score_test_rows(test, items, user_codes, item_codes, prompt=cfg.prompt, llm=cfg.llm,
                                        score=cfg.score, mf=mf, binmf=binmf, model=llm, tokenizer=tokenizer)
    log.info("%d of %d rows took the text-only prompt (user or item without a code)", fallbacks, test.num_rows)
    storage.write_table(scores, test_scores_uri(layout.run_dir), cfg.storage)
    return scores


def main(cfg: Config) -> pa.Table:
    """The metrics table of the run's test scores (computed unless <run dir>/eval/test_scores.parquet exists)."""
    if tracking.is_registered(cfg.tune.adapter):
        raise ConfigError(f"config key 'tune.adapter': {cfg.tune.adapter}: jobs.evaluate scores the run's adapter "
                          "folder (empty: <run dir>/adapter); models:/ adapters are read by jobs.score")
    uri = test_scores_uri(cfg.run_dir())
    scored = storage.exists(uri, cfg.storage)
    if not scored:  # before the MLflow run: a mismatched adapter ends the job with nothing written
        layout = cfg.layout()
        prompt_spec.check_adapter(layout.adapter, cfg.prompt, cfg.llm, cfg.data.history_len, layout)
    with tracking.job_run(cfg.tracking, cfg.run.output_root, run_name=cfg.run.name, job="evaluate",
                          params=cfg.to_dict()) as tracked:
        if scored:
            scores = storage.read_table(uri, cfg.storage, what="test scores")
        else:
            scores = compute_test_scores(cfg)
        table, text = write_report(scores, cfg.run_dir(), cfg.run.seed, cfg.storage)
        tracked.log_report(table.to_pylist())
        tracked.log_files([storage.join_uri(eval_uri(cfg.run_dir()), "metrics.md")], "eval", cfg.storage)
    print(text)
    return table

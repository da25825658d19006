"""Evaluate: AUC / UAUC of every method on the test split, overall and warm/cold.

Reads <run dir>/eval/test_scores.parquet (long format: user_id, item_id, label, warm, method, logit),
writes <run dir>/eval/metrics.parquet and metrics.md, and prints the table.

    python -m jobs.evaluate --config ray_config.yaml --set run.name=<run id>
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm import storage
from binllm.cli import run_job
from binllm.config import Config
from binllm.metrics import evaluate_scores, format_report, report_table

log = logging.getLogger("jobs.evaluate")
SCORES_COLUMNS = ["user_id", "item_id", "label", "warm", "method", "logit"]


def eval_uri(cfg: Config) -> str:
    return storage.join_uri(cfg.run_dir(), "eval")


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
    fs, path = storage.filesystem_for(storage.join_uri(uri, "metrics.md"), cfg.storage)
    with fs.open_output_stream(path) as out:
        out.write(f"```\n{text}\n```\n".encode())
    return table, text


def run(cfg: Config) -> pa.Table:
    scores = storage.read_table(storage.join_uri(eval_uri(cfg), "test_scores.parquet"), cfg.storage, what="test scores")
    table, text = write_report(cfg, scores)
    print(text)
    return table


if __name__ == "__main__":
    run_job(run, __doc__)

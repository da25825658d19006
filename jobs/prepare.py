"""Prepare: interactions + catalog -> labelled, time-split examples with histories and warm flags.

    python -m jobs.prepare --config ray_config.yaml --set data.format=grouplens --set data.path=ml-1m
"""
from __future__ import annotations

import logging
import time

from binllm.cli import run_job
from binllm.config import Config
from binllm.data import prepare_examples
from binllm.sources import load_interactions, write_examples

log = logging.getLogger("jobs.prepare")


def run(cfg: Config):
    start = time.perf_counter()
    interactions, items = load_interactions(cfg)
    examples = prepare_examples(interactions, cfg.data)
    uri = write_examples(cfg, examples, items)
    splits = examples.column("split").value_counts().to_pylist()
    counts = {s["values"]: s["counts"] for s in splits}
    positive = sum(examples.column("label").to_pylist()) / max(examples.num_rows, 1)
    log.info("prepared %d of %d interactions (%s), positive rate %.3f, in %.1fs -> %s",
             examples.num_rows, interactions.num_rows, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             positive, time.perf_counter() - start, uri)
    return examples, items


if __name__ == "__main__":
    run_job(run, __doc__)

"""Prepare: interactions + catalog -> labelled, time-split examples with histories and warm flags.

    binllm prepare --config ray_config.yaml --set data.format=grouplens --set data.path=ml-1m
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pyarrow as pa

from binllm import assets, sources, storage
from binllm.config import Config
from binllm.data import prepare_examples, read_grouplens, read_recbole, read_table
from binllm.data.schema import DataError

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data")


@dataclass(frozen=True)
class Inputs:
    interactions: pa.Table
    items: pa.Table
    started: float


def load_interactions(cfg: Config) -> tuple[pa.Table, pa.Table]:
    """(interactions, items) from cfg.data, normalised (see binllm.data.schema)."""
    data = cfg.data
    if data.format in ("demo_ml100k", "demo_ml1m"):
        return read_recbole(assets.movielens_100k() if data.format == "demo_ml100k" else assets.movielens_1m())
    if data.format in ("recbole", "grouplens"):
        if not data.path:
            raise DataError(f"config key 'data.path': required for data.format '{data.format}' (a local folder)")
        return read_recbole(data.path) if data.format == "recbole" else read_grouplens(data.path)
    if not data.interactions or not data.items:
        raise DataError("config keys 'data.interactions' and 'data.items': required for data.format 'table'")
    inter_fs, inter_path = storage.filesystem_for(data.interactions, cfg.storage)
    items_fs, items_path = storage.filesystem_for(data.items, cfg.storage)
    return read_table(inter_path, items_path, data.columns, filesystem=inter_fs, items_filesystem=items_fs)


def setup(cfg: Config) -> Inputs:
    started = time.perf_counter()
    interactions, items = load_interactions(cfg)
    return Inputs(interactions, items, started)


def run(cfg: Config, inputs: Inputs) -> pa.Table:
    return prepare_examples(inputs.interactions, cfg.data)


def publish(cfg: Config, inputs: Inputs, examples: pa.Table) -> tuple[pa.Table, pa.Table]:
    uri = sources.write_examples(cfg, examples, inputs.items)
    counts = {s["values"]: s["counts"] for s in examples.column("split").value_counts().to_pylist()}
    positive = sum(examples.column("label").to_pylist()) / max(examples.num_rows, 1)
    log.info("prepared %d of %d interactions (%s), positive rate %.3f, in %.1fs -> %s",
             examples.num_rows, inputs.interactions.num_rows, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             positive, time.perf_counter() - inputs.started, uri)
    return examples, inputs.items


def main(cfg: Config) -> tuple[pa.Table, pa.Table]:
    inputs = setup(cfg)
    return publish(cfg, inputs, run(cfg, inputs))

"""Prepare: interactions + catalog -> labelled, time-split examples with histories and warm flags.

    binllm prepare --config ray_config.yaml --set data.format=grouplens --set data.path=ml-1m

Writes examples.parquet, items.parquet and profile.json (the data profile, also printed as a short table)
under <run dir>/examples (or data.examples). A data set that cannot train (an empty split, a split with one
label, an implicit log without data.negatives, ratings outside data.rating_scale, ...) is refused before
anything is written, in one line naming the key, column or file to change.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pyarrow as pa

from binllm import assets, sources, storage
from binllm.config import Config
from binllm.data import prepare_examples, read_grouplens, read_recbole, read_table
from binllm.data.profile import PROFILE_FILE, build_profile, check_trainable, format_profile
from binllm.data.schema import DataError

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data")


@dataclass(frozen=True)
class Inputs:
    interactions: pa.Table
    items: pa.Table
    started: float


@dataclass(frozen=True)
class Prepared:
    examples: pa.Table
    profile: dict  # binllm.data.profile.build_profile: written as examples/profile.json


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


def sources_named(cfg: Config) -> tuple[str, str]:
    """(interaction log, item catalog) as errors name them."""
    data = cfg.data
    if data.format in ("demo_ml100k", "demo_ml1m"):
        name = f"the demo data ({data.format})"
        return name, name
    if data.format in ("recbole", "grouplens"):
        return data.path, data.path
    return data.interactions, data.items


def setup(cfg: Config) -> Inputs:
    started = time.perf_counter()
    interactions, items = load_interactions(cfg)
    return Inputs(interactions, items, started)


def run(cfg: Config, inputs: Inputs) -> Prepared:
    """Examples and their profile; refuses (DataError naming the key, column or file) what cannot train."""
    source, items_source = sources_named(cfg)
    report: dict = {}
    examples = prepare_examples(inputs.interactions, cfg.data, source=source, report=report)
    profile = build_profile(examples, inputs.items, report, cfg.data)
    check_trainable(profile, cfg.data, source, items_source)
    return Prepared(examples, profile)


def publish(cfg: Config, inputs: Inputs, prepared: Prepared) -> tuple[pa.Table, pa.Table]:
    examples, profile = prepared.examples, prepared.profile
    uri = sources.write_examples(cfg, examples, inputs.items)
    profile_uri = storage.join_uri(uri, PROFILE_FILE)
    storage.write_json(profile, profile_uri, cfg.storage)
    print(format_profile(profile, profile_uri), flush=True)
    counts = {s["values"]: s["counts"] for s in examples.column("split").value_counts().to_pylist()}
    log.info("prepared %d of %d interactions (%s), positive rate %.3f, in %.1fs -> %s",
             examples.num_rows, inputs.interactions.num_rows, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             profile["positive_rate"], time.perf_counter() - inputs.started, uri)
    return examples, inputs.items


def main(cfg: Config) -> tuple[pa.Table, pa.Table]:
    inputs = setup(cfg)
    return publish(cfg, inputs, run(cfg, inputs))

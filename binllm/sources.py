"""A run's layout: where a run's files live (prepared examples, code tables, the encoder, the adapter)
under <output_root>/<run.name>/ or the configured locations, reading and writing them, and where the
base model lives (a local folder, an s3:// prefix copied once per node, or the demo model)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from binllm import storage
from binllm.config import Config

DEMO_MODEL = "demo:smollm2-135m"


def examples_uri(cfg: Config) -> str:
    return cfg.data.examples or storage.join_uri(cfg.run_dir(), "examples")


def codes_uri(cfg: Config) -> str:
    return cfg.encoder.codes or storage.join_uri(cfg.run_dir(), "codes")


def adapter_uri(cfg: Config) -> str:
    return cfg.tune.adapter or storage.join_uri(cfg.run_dir(), "adapter")


def write_examples(cfg: Config, examples: pa.Table, items: pa.Table) -> str:
    uri = examples_uri(cfg)
    storage.write_table(examples, storage.join_uri(uri, "examples.parquet"), cfg.storage)
    storage.write_table(items, storage.join_uri(uri, "items.parquet"), cfg.storage)
    return uri


def read_examples(cfg: Config) -> tuple[pa.Table, pa.Table]:
    """(examples, items) written by jobs.prepare."""
    uri = examples_uri(cfg)
    examples = storage.read_table(storage.join_uri(uri, "examples.parquet"), cfg.storage, what="prepared examples")
    items = storage.read_table(storage.join_uri(uri, "items.parquet"), cfg.storage, what="item catalog")
    return examples, items


def read_code_tables(cfg: Config) -> tuple[pa.Table, pa.Table]:
    """(user codes, item codes) written by encoder pretraining."""
    uri = codes_uri(cfg)
    return (storage.read_table(storage.join_uri(uri, "users.parquet"), cfg.storage, what="user code table"),
            storage.read_table(storage.join_uri(uri, "items.parquet"), cfg.storage, what="item code table"))


def encoder_uri(cfg: Config) -> str:
    return storage.join_uri(cfg.run_dir(), "encoder")


def load_base_model(cfg: Config, *, dtype: str = "", device="cpu"):
    """(model, tokenizer) of llm.model in `dtype` (default llm.dtype), with llm.trust_remote_code."""
    from binllm.llm import load_causal_lm

    return load_causal_lm(model_folder(cfg.llm.model, cfg), dtype=dtype or cfg.llm.dtype, device=device,
                          trust_remote_code=cfg.llm.trust_remote_code)


def model_folder(location: str, cfg: Config) -> Path:
    """A local folder with the model: `location` itself, a node-local copy of an s3:// prefix, or the demo model."""
    if location == DEMO_MODEL:
        from binllm import assets

        return assets.smollm2_135m()
    return storage.local_copy(location, storage_cfg=cfg.storage)

"""A run's files: reading and writing the prepared examples and code tables at the places a RunLayout
names (<output_root>/<run.name>/... or the configured locations), and where the base model lives (a
local folder, an s3:// prefix copied once per node, or the demo model)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from binllm import assets, storage
from binllm.config import LLMConfig, RunLayout, StorageConfig
from binllm.llm import load_causal_lm

DEMO_MODEL = "demo:smollm2-135m"


def write_examples(layout: RunLayout, examples: pa.Table, items: pa.Table) -> str:
    storage.write_table(examples, storage.join_uri(layout.examples, "examples.parquet"), layout.storage)
    storage.write_table(items, storage.join_uri(layout.examples, "items.parquet"), layout.storage)
    return layout.examples


def read_examples(layout: RunLayout) -> tuple[pa.Table, pa.Table]:
    """(examples, items) written by jobs.prepare."""
    uri = layout.examples
    examples = storage.read_table(storage.join_uri(uri, "examples.parquet"), layout.storage, what="prepared examples")
    items = storage.read_table(storage.join_uri(uri, "items.parquet"), layout.storage, what="item catalog")
    return examples, items


def read_code_tables(layout: RunLayout) -> tuple[pa.Table, pa.Table]:
    """(user codes, item codes) written by encoder pretraining."""
    uri = layout.codes
    return (storage.read_table(storage.join_uri(uri, "users.parquet"), layout.storage, what="user code table"),
            storage.read_table(storage.join_uri(uri, "items.parquet"), layout.storage, what="item code table"))


def load_base_model(llm: LLMConfig, storage_cfg: StorageConfig, *, dtype: str = "", device="cpu"):
    """(model, tokenizer) of llm.model in `dtype` (default llm.dtype), with llm.trust_remote_code."""
    return load_causal_lm(model_folder(llm.model, storage_cfg), dtype=dtype or llm.dtype, device=device,
                          trust_remote_code=llm.trust_remote_code)


def model_folder(location: str, storage_cfg: StorageConfig) -> Path:
    """A local folder with the model: `location` itself, a node-local copy of an s3:// prefix, or the demo model."""
    if location == DEMO_MODEL:
        return assets.smollm2_135m()
    return storage.local_copy(location, storage_cfg=storage_cfg)

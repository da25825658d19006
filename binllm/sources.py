"""A run's layout: where jobs read their inputs (the configured interaction source, prepared examples,
code tables, model folders: local, s3:// or the demo assets fetched from PyPI packages) and write
what the next job reads."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from binllm import storage
from binllm.config import Config
from binllm.data import read_grouplens, read_recbole, read_table
from binllm.data.schema import DataError

DEMO_MODEL = "demo:smollm2-135m"


def load_interactions(cfg: Config) -> tuple[pa.Table, pa.Table]:
    """(interactions, items) from cfg.data, normalised (see binllm.data.schema)."""
    data = cfg.data
    if data.format in ("demo_ml100k", "demo_ml1m"):
        from binllm import assets

        folder = assets.movielens_100k() if data.format == "demo_ml100k" else assets.movielens_1m()
        return read_recbole(folder)
    if data.format in ("recbole", "grouplens"):
        if not data.path:
            raise DataError(f"config key 'data.path': required for data.format '{data.format}' (a local folder)")
        return read_recbole(data.path) if data.format == "recbole" else read_grouplens(data.path)
    if not data.interactions or not data.items:
        raise DataError("config keys 'data.interactions' and 'data.items': required for data.format 'table'")
    inter_fs, inter_path = storage.filesystem_for(data.interactions, cfg.storage)
    items_fs, items_path = storage.filesystem_for(data.items, cfg.storage)
    return read_table(inter_path, items_path, data.columns, filesystem=inter_fs, items_filesystem=items_fs)


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


def write_encoder_outputs(cfg: Config, result) -> None:
    """The code tables (<codes>/users.parquet, items.parquet) and the encoder itself (<run dir>/encoder)."""
    from binllm.encoder import export_codes, save_encoder, write_code_tables

    users, items = export_codes(result)
    fs, codes_path = storage.filesystem_for(codes_uri(cfg), cfg.storage)
    write_code_tables(users, items, codes_path, filesystem=fs)
    fs, encoder_path = storage.filesystem_for(encoder_uri(cfg), cfg.storage)
    save_encoder(result, encoder_path, filesystem=fs)


def model_folder(location: str, cfg: Config) -> Path:
    """A local folder with the model: `location` itself, a node-local copy of an s3:// prefix, or the demo model."""
    if location == DEMO_MODEL:
        from binllm import assets

        return assets.smollm2_135m()
    return storage.local_copy(location, storage_cfg=cfg.storage)

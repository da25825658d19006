"""Synthetic benchmark inputs: clustered examples, random code tables, and a random-weight LLM folder of a
named shape (binllm.benchmarks.shapes) with the tiny test tokenizer. Nothing is downloaded: the benchmarks'
figures depend on shapes and prompt lengths only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from binllm import sources, storage
from binllm.benchmarks.shapes import SHAPES
from binllm.codes import code_table
from binllm.config import Config
from binllm.llm import build_tiny_llm

TITLE_WORDS = ("Space", "Romance", "Crime", "Cartoon", "Western", "Mystery", "Musical", "War")


def random_llm_folder(folder: str | Path, shape: str, seed: int = 0) -> Path:
    """A Hugging Face folder with a random LlamaForCausalLM of `shape` and the tiny test tokenizer."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; expected one of {sorted(SHAPES)}")
    folder = Path(folder)
    build_tiny_llm(folder, seed=seed)  # writes the tokenizer; its tiny model is replaced below
    ids = json.loads((folder / "config.json").read_text())
    config = LlamaConfig(**SHAPES[shape], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                         pad_token_id=ids["pad_token_id"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def synthetic_examples(n_users: int, n_items: int, n_rows: int, history_len: int, seed: int = 0
                       ) -> tuple[pa.Table, pa.Table]:
    """Examples (prepared-examples contract) where a user clicks items of its own cluster with p=0.8,
    others with p=0.2; 80/10/10 time split; item titles carry the cluster word."""
    rng = np.random.default_rng(seed)
    clusters = len(TITLE_WORDS)
    user_cluster, item_cluster = rng.integers(0, clusters, n_users), rng.integers(0, clusters, n_items)
    users, items = rng.integers(0, n_users, n_rows), rng.integers(0, n_items, n_rows)
    labels = rng.random(n_rows) < np.where(user_cluster[users] == item_cluster[items], 0.8, 0.2)
    item_ids = np.array([f"i{k}" for k in range(n_items)], dtype=object)
    history, clicked = [], {}
    for u, i, y in zip(users.tolist(), items.tolist(), labels.tolist()):
        seen = clicked.setdefault(u, [])
        history.append(seen[-history_len:])
        if y:
            seen.append(item_ids[i])
    n_train, n_valid = int(0.8 * n_rows), int(0.1 * n_rows)
    split = ["train"] * n_train + ["valid"] * n_valid + ["test"] * (n_rows - n_train - n_valid)
    examples = pa.table({
        "user_id": pa.array([f"u{u}" for u in users.tolist()], pa.string()),
        "item_id": pa.array(item_ids[items].tolist(), pa.string()),
        "label": pa.array(labels.astype(np.int8)),
        "timestamp": pa.array(np.arange(n_rows, dtype=np.int64) * 60 + 1_600_000_000),
        "split": pa.array(split, pa.string()),
        "history": pa.array(history, pa.list_(pa.string())),
        "warm": pa.array(np.ones(n_rows, dtype=bool)),
    })
    titles = [f"The {TITLE_WORDS[c]} Story of Number {k} ({1950 + k % 70})"
              for k, c in enumerate(item_cluster.tolist())]
    return examples, pa.table({"item_id": pa.array(item_ids.tolist(), pa.string()), "title": pa.array(titles)})


def random_codes(ids: list[str], seed: int) -> pa.Table:
    return code_table(ids, np.random.default_rng(seed).integers(0, 256, (len(ids), 4), dtype=np.uint8))


def synthetic_tables(n_users: int, n_items: int, n_rows: int, history_len: int, seed: int = 0
                     ) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    """(examples, items, user codes, item codes): synthetic_examples with random codes for users u0.. and
    items i0.."""
    examples, items = synthetic_examples(n_users, n_items, n_rows, history_len, seed)
    return (examples, items, random_codes([f"u{k}" for k in range(n_users)], 1),
            random_codes([f"i{k}" for k in range(n_items)], 2))


def write_synthetic_inputs(cfg: Config, n_users: int, n_items: int, n_rows: int) -> None:
    """Synthetic examples and random code tables where the run's jobs read them."""
    examples, items, user_codes, item_codes = synthetic_tables(n_users, n_items, n_rows, cfg.data.history_len,
                                                               cfg.run.seed)
    layout = cfg.layout()
    sources.write_examples(layout, examples, items)
    storage.write_table(user_codes, storage.join_uri(layout.codes, "users.parquet"), cfg.storage)
    storage.write_table(item_codes, storage.join_uri(layout.codes, "items.parquet"), cfg.storage)

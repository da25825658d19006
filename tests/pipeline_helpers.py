"""Inputs for the scoring-pipeline tests: synthetic examples, random code tables, a LoRA adapter with
non-zero weights, requests; plus the reference computations the pipeline's output is checked against."""
import tempfile

import numpy as np
import pyarrow as pa
import torch

from binllm import codes, storage
from binllm.config import load_config
from binllm.llm import answer_tokens, apply_lora, load_adapter, load_causal_lm, save_adapter, score_prompts
from binllm.prompts import build_prompts
from synthetic import make_planted_examples

DT = "2026-11-26"
N_USERS, N_ITEMS = 12, 30
UNCODED_USERS = {"u10", "u11"}
UNCODED_ITEMS = {"i28", "i29"}


def random_code_table(ids, seed):
    bits = np.random.default_rng(seed).integers(0, 2, (len(ids), 32))
    return codes.code_table(ids, codes.pack_bits(bits.astype(np.uint8)))


def write_inputs(root: str, llm_dir) -> dict:
    """Examples, catalog, code tables (some users/items without a code), a LoRA adapter with non-zero
    weights, and requests (including an unknown user) under `root` (local path or s3:// URI)."""
    examples, items = make_planted_examples(N_USERS, N_ITEMS, 240, seed=3)
    storage.write_table(examples, f"{root}/examples/examples.parquet")
    storage.write_table(items, f"{root}/examples/items.parquet")
    users = [f"u{k}" for k in range(N_USERS) if f"u{k}" not in UNCODED_USERS]
    item_ids = [f"i{k}" for k in range(N_ITEMS) if f"i{k}" not in UNCODED_ITEMS]
    storage.write_table(random_code_table(users, 1), f"{root}/codes/users.parquet")
    storage.write_table(random_code_table(item_ids, 2), f"{root}/codes/items.parquet")
    model, _ = load_causal_lm(llm_dir, dtype="float32")
    peft = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param, generator=torch.Generator().manual_seed(7)) * 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        storage.upload_dir(save_adapter(peft, tmp), f"{root}/adapter")
    rng = np.random.default_rng(5)
    pairs = [(f"u{rng.integers(0, N_USERS)}", f"i{rng.integers(0, N_ITEMS)}") for _ in range(40)]
    pairs += [("u10", "i3"), ("u2", "i29"), ("stranger", "i4")]  # uncoded user, uncoded item, unknown user
    requests = pa.table({"user_id": [p[0] for p in pairs], "item_id": [p[1] for p in pairs]})
    storage.write_table(requests, f"{root}/requests.parquet")
    return {"examples": examples, "items": items, "requests": requests}


def scoring_config(root: str, llm_dir, **extra):
    overrides = {
        "run.output_root": root, "run.name": "nightly", "llm.model": str(llm_dir), "llm.dtype": "float32",
        "data.examples": f"{root}/examples", "encoder.codes": f"{root}/codes", "tune.adapter": f"{root}/adapter",
        "score.requests": f"{root}/requests.parquet", "score.dt": DT, "score.num_actors": 1,
        "score.cpus_per_actor": 0.5, "score.partitions": 1, "score.batch_size": 16, "data.history_len": 5,
    } | extra
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def expected_logits(cfg, rows: pa.Table, items: pa.Table, root: str) -> np.ndarray:
    """Direct score_prompts of the same pairs (unmerged PEFT model), the reference for the pipeline."""
    user_codes = storage.read_table(f"{root}/codes/users.parquet")
    item_codes = storage.read_table(f"{root}/codes/items.parquet")
    model, tokenizer = load_causal_lm(cfg.llm.model, dtype="float32")
    batch = build_prompts(rows, items, user_codes, item_codes, cfg.prompt, tokenizer=tokenizer)
    model = load_adapter(model, storage.local_copy(f"{root}/adapter"))
    answer = answer_tokens(tokenizer, batch.prefix[0] + batch.suffix[0], " Yes", " No")
    return score_prompts(model, tokenizer, batch.prefix, batch.suffix, answer_id=answer), batch.fallback


def histories_before(examples: pa.Table, cutoff: int, n: int) -> dict:
    out = {}
    rows = sorted(zip(examples["user_id"].to_pylist(), examples["timestamp"].to_pylist(),
                      examples["item_id"].to_pylist(), examples["label"].to_pylist()))
    for user, ts, item, label in rows:
        if label == 1 and ts < cutoff:
            out.setdefault(user, []).append(item)
    return {u: h[-n:] for u, h in out.items()}


def brute_force_top_k(root: str, user: str, seen: set, k: int) -> set:
    """The k unseen coded items nearest to `user` by Hamming distance, ties by code-table order."""
    user_ids, user_packed = codes.read_code_table(storage.read_table(f"{root}/codes/users.parquet"))
    item_ids, item_packed = codes.read_code_table(storage.read_table(f"{root}/codes/items.parquet"))
    ub = np.unpackbits(user_packed[list(user_ids).index(user)])
    ranked = sorted((int((ub != np.unpackbits(p)).sum()), n, i) for n, (i, p) in enumerate(zip(item_ids, item_packed))
                    if i not in seen)
    return {i for _, _, i in ranked[:k]}


def seen_items(examples: pa.Table) -> dict:
    seen = {}
    for u, i in zip(examples["user_id"].to_pylist(), examples["item_id"].to_pylist()):
        seen.setdefault(u, set()).add(i)
    return seen

"""The Ray Data scoring pipeline against a plain Python loop over the same pairs and model, and top-K
candidate generation by Hamming distance (jobs.benchmark_pipeline). One JSON line per measurement.

Without --model, a randomly initialised LLaMA (hidden 256, 4 layers) with the tiny test tokenizer stands in
for the LLM; a LoRA adapter with random weights is applied either way.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from binllm.ray_env import loopback_ray_env

loopback_ray_env()  # before anything imports ray

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from binllm import codes, storage
from binllm.candidates import SeenItems, top_k_hamming
from binllm.config import load_config
from binllm.llm import answer_tokens, apply_lora, build_tiny_llm, load_causal_lm, save_adapter, score_prompts
from binllm.pipeline.pairs import attach_histories, user_histories
from binllm.pipeline.publish import read_partition
from binllm.pipeline.run import ScoringJob, run_scoring
from binllm.pipeline.scorer import load_scoring_model
from binllm.prompts import build_prompts

DT = "2026-11-26"


def bench_candidates(n_users: int, n_items: int, k: int, seen_per_user: int) -> dict:
    rng = np.random.default_rng(0)
    users = rng.integers(0, 256, (n_users, 4), dtype=np.uint8)
    items = rng.integers(0, 256, (n_items, 4), dtype=np.uint8)
    seen = SeenItems.from_pairs(np.repeat(np.arange(n_users), seen_per_user),
                                rng.integers(0, n_items, n_users * seen_per_user), n_users)
    start = time.perf_counter()
    u, _, _ = top_k_hamming(users, items, k, seen)
    seconds = time.perf_counter() - start
    return {"bench": "candidates", "users": n_users, "items": n_items, "k": k, "seen_per_user": seen_per_user,
            "threads": os.cpu_count(), "seconds": round(seconds, 2), "us_per_user": round(seconds / n_users * 1e6, 1),
            "rows": int(u.size)}


def write_inputs(root: Path, model_dir: Path, n_users: int, n_items: int, candidates: int) -> pa.Table:
    rng = np.random.default_rng(1)
    user_ids = [f"u{k}" for k in range(n_users)]
    item_ids = [f"i{k}" for k in range(n_items)]
    n_log = n_users * 15
    log = pa.table({
        "user_id": pa.array(rng.choice(user_ids, n_log), pa.string()),
        "item_id": pa.array(rng.choice(item_ids, n_log), pa.string()),
        "label": pa.array(rng.integers(0, 2, n_log), pa.int8()),
        "timestamp": pa.array(1_600_000_000 + rng.permutation(n_log), pa.int64()),
    })
    storage.write_table(log, str(root / "examples" / "examples.parquet"))
    storage.write_table(pa.table({"item_id": item_ids, "title": [f"Movie number {k} (1999)" for k in range(n_items)]}),
                        str(root / "examples" / "items.parquet"))
    for name, ids in (("users", user_ids), ("items", item_ids)):
        bits = rng.integers(0, 2, (len(ids), 32)).astype(np.uint8)
        storage.write_table(codes.code_table(ids, codes.pack_bits(bits)), str(root / "codes" / f"{name}.parquet"))
    requests = pa.table({"user_id": np.repeat(user_ids, candidates).tolist(),
                         "item_id": [item_ids[i] for i in rng.integers(0, n_items, n_users * candidates)]})
    storage.write_table(requests, str(root / "requests.parquet"))
    model, _ = load_causal_lm(model_dir, dtype="float32")
    peft = apply_lora(model, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    save_adapter(peft, root / "adapter")
    return requests


def plain_loop(cfg, root: Path, requests: pa.Table, batch_size: int) -> tuple[float, np.ndarray]:
    """The same work without Ray: histories, prompts, then score_prompts batch by batch."""
    model, tokenizer = load_scoring_model(cfg.llm, cfg.storage, str(root / "adapter"), dtype=cfg.score.dtype,
                                          device="cpu")
    start = time.perf_counter()
    log = storage.read_table(str(root / "examples" / "examples.parquet"))
    log = log.append_column("positive", pc.equal(log["label"], 1))
    users, histories = user_histories(log, cfg.data.history_len)
    order = np.argsort(np.asarray(requests["user_id"].to_pylist(), dtype=object), kind="stable")
    rows = requests.take(pa.array(order))
    rows = rows.append_column("history", attach_histories(rows["user_id"].combine_chunks(), users, histories))
    batch = build_prompts(rows, storage.read_table(str(root / "examples" / "items.parquet")),
                          storage.read_table(str(root / "codes" / "users.parquet")),
                          storage.read_table(str(root / "codes" / "items.parquet")), cfg.prompt, tokenizer=tokenizer)
    answer = answer_tokens(tokenizer, batch.prefix[0] + batch.suffix[0], cfg.llm.answer, cfg.llm.negative_answer)
    logits = []
    for s in range(0, len(batch), batch_size):
        logits.append(score_prompts(model, tokenizer, batch.prefix[s:s + batch_size], batch.suffix[s:s + batch_size],
                                    answer_id=answer, shared_prefix=cfg.score.shared_prefix,
                                    max_batch_tokens=cfg.score.max_batch_tokens))
    return time.perf_counter() - start, np.concatenate(logits)


def bench_pipeline(args) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = Path(args.model) if args.model else build_tiny_llm(root / "llm", hidden_size=256, num_layers=4)
        requests = write_inputs(root, model_dir, args.users, args.items, args.candidates)
        overrides = {
            "run.output_root": str(root), "run.name": "bench", "llm.model": str(model_dir), "llm.dtype": "float32",
            "data.examples": str(root / "examples"), "encoder.codes": str(root / "codes"),
            "tune.adapter": str(root / "adapter"), "score.requests": str(root / "requests.parquet"),
            "score.dt": DT, "score.num_actors": 1, "score.cpus_per_actor": float(args.threads),
            "score.batch_size": args.batch_size, "score.partitions": 1,
        }
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
        torch.set_num_threads(args.threads)
        loop_s, loop_logits = plain_loop(cfg, root, requests, args.batch_size)
        pairs = requests.num_rows
        out.append({"bench": "plain_loop", "pairs": pairs, "threads": args.threads, "seconds": round(loop_s, 2),
                    "pairs_per_s": round(pairs / loop_s, 1)})
        # Logical CPUs beyond the scoring actor's, so that reading and per-user tasks never wait for it.
        ray.init(address="local", num_cpus=args.threads + 2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for attempt in range(args.repeats):
                summary = run_scoring(ScoringJob(
                    score=cfg.score, llm=cfg.llm, prompt=cfg.prompt, history_len=cfg.data.history_len,
                    min_rating=cfg.data.min_rating, run_name=cfg.run.name, layout=cfg.layout(),
                    config_record=cfg.to_dict()))
                out.append({"bench": "pipeline", "attempt": attempt, "pairs": summary.rows_out,
                            "threads": args.threads, "seconds": round(summary.seconds, 2),
                            "pairs_per_s": round(summary.pairs_per_s, 1),
                            "overhead_vs_loop": round(summary.seconds / loop_s, 2)})
            scored = read_partition(cfg.score.output or f"{root}/bench/scores", DT)
            diff = np.abs(np.sort(scored["logit"].to_numpy()) - np.sort(loop_logits))
            out[-1]["max_abs_diff_vs_loop"] = float(diff.max())  # same multiset of logits
        finally:
            ray.shutdown()
    return out


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="", help="Hugging Face model folder (default: a random small LLaMA)")
    parser.add_argument("--cand-users", type=int, default=100_000)
    parser.add_argument("--cand-items", type=int, default=100_000)
    parser.add_argument("--cand-k", type=int, default=20)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-candidates", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_candidates:
        print(json.dumps(bench_candidates(args.cand_users, args.cand_items, args.cand_k, 50)), flush=True)
    if not args.skip_pipeline:
        for line in bench_pipeline(args):
            print(json.dumps(line), flush=True)


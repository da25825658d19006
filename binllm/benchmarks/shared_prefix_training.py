"""Shared-prefix vs full-prompt LoRA tuning steps, measured in one run on the same micro-batches.

    python -m jobs.benchmark_shared_prefix_training --shape smollm2-135m --steps 6
    python -m jobs.benchmark_shared_prefix_training --set tune.stage2.micro_batch_tokens=4096 --set tune.autocast=bfloat16

Synthetic examples (binllm.benchmarks.synthetic: a user's rows share their prefix until the user's history
changes; --train-rows of them, a seeded sample, set how often), full prompts with --history titles, random
codes, a random-weight LLM of the named shape, LoRA per tune.lora. The training rows are planned once by
shared_prefix_micro_batches (tune.stage2.micro_batch_size rows, or micro_batch_tokens); each of the first
--steps micro-batches (after one untimed warm-up) takes an AdamW step with the full-prompt loss and one
with the shared-prefix loss, alternately, through the tuning code's own loss (binllm.tune.StageTask).
Both paths train the same rows and prompt tokens, so their tokens/s and rows/s ratios are the same.

Measured on the 2-core build machine (busy with other jobs; `--threads 1`, defaults otherwise: 6 micro-batches
of at most 8 rows, 41 rows, 1.95 rows per prefix, prefixes 58% of the prompt tokens, fp32, LoRA r=8 on
q_proj/v_proj): full 152 prompt tokens/s (1.15 rows/s), shared 203 (1.54 rows/s): 1.33x; the shared path
computed 3,939 tokens where the full one computed 5,416 (1.37x). With 2 threads on the loaded machine both
paths stalled (30 and 24 tokens/s) and the ratio was noise.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from binllm.benchmarks.shapes import SHAPES
from binllm.benchmarks.synthetic import random_llm_folder, synthetic_tables
from binllm.config import load_config
from binllm.llm import answer_tokens, apply_lora, autocast_dtype, load_causal_lm
from binllm.train.backend import LocalBackend
from binllm.train.micro_batches import shared_prefix_micro_batches
from binllm.tune import StageTask, split_rows, tokenize_rows

PATHS = ("full", "shared")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per path")
    parser.add_argument("--history", type=int, default=10, help="history titles per prompt (prompt length)")
    parser.add_argument("--train-rows", type=int, default=800, help="training rows sampled from 2,000 synthetic "
                        "examples of 200 users (800: 1.84 rows per prefix, as ML-1M's 1.83; fewer: less sharing)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.config, ["tune.mode=intuitive", f"data.history_len={args.history}", *args.overrides])
    stage, seed = cfg.tune.stage2, cfg.run.seed
    examples, items, user_codes, item_codes = synthetic_tables(200, 400, 2000, args.history, seed)
    with tempfile.TemporaryDirectory(prefix="binllm-bench-") as work:
        model, tokenizer = load_causal_lm(random_llm_folder(Path(work, "model"), args.shape), dtype=cfg.llm.dtype,
                                          device=device)
    train, prompt = tokenize_rows(split_rows(examples, "train", args.train_rows, seed), items, user_codes, item_codes,
                                  cfg.prompt, "full", tokenizer)
    answer = answer_tokens(tokenizer, prompt, cfg.llm.answer, cfg.llm.negative_answer)
    lora = cfg.tune.lora
    torch.manual_seed(seed)
    model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                       top_layers=lora.top_layers).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stage.lr)
    autocast = autocast_dtype(cfg.tune.autocast, device)
    backend = LocalBackend(device)
    tasks = {path: StageTask(backend, train, train, stage, answer, tokenizer.pad_token_id, seed, autocast,
                              shared_prefix=path == "shared") for path in PATHS}
    plan = shared_prefix_micro_batches(train.prefix_of_row, train.prefix_lengths, train.lengths, 1, seed, 0,
                                       micro_batch_size=stage.micro_batch_size,
                                       micro_batch_tokens=stage.micro_batch_tokens)[: args.steps + 1]
    seconds = dict.fromkeys(PATHS, 0.0)
    for step, rows in enumerate(plan):
        for path in PATHS:
            if step == 1:  # the first micro-batch warms both paths up
                tasks[path].train_tokens = tasks[path].padded_tokens = 0
            started = time.perf_counter()
            tasks[path].loss(model, rows, 0).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step:
                seconds[path] += time.perf_counter() - started
    timed = plan[1:]
    rows = sum(len(b) for b in timed)
    prompt_tokens = sum(int(train.lengths[b].sum()) for b in timed)
    prefixes = sum(len(np.unique(train.prefix_of_row[b])) for b in timed)
    prefix_share = sum(int(train.prefix_lengths[b].sum()) for b in timed) / prompt_tokens
    print(f"shared-prefix vs full-prompt LoRA tuning, {args.shape}, {device.type}, {torch.get_num_threads()} "
          f"thread(s), dtype {cfg.llm.dtype}, autocast {cfg.tune.autocast or 'off'}: {len(timed)} micro-batches, "
          f"{rows} rows, {rows / prefixes:.2f} rows per prefix, prefixes {prefix_share:.0%} of the prompt tokens")
    for path in PATHS:
        task = tasks[path]
        print(f"  {path:6s}: {prompt_tokens / seconds[path]:8,.0f} prompt tokens/s, {rows / seconds[path]:6.2f} rows/s "
              f"({seconds[path]:.1f} s; computed {task.train_tokens:,} tokens, {task.padded_tokens:,} with padding)")
    print(f"  shared / full: {seconds['full'] / seconds['shared']:.2f}x rows/s and prompt tokens/s")


"""LoRA tuning speed with a frozen-trunk cache against today's paths, in one run on the same micro-batches.

    python -m jobs.benchmark_trunk_cache_training --model ~/.cache/binllm/models/SmolLM2-135M-Instruct
    python -m jobs.benchmark_trunk_cache_training --shape smollm2-135m --top-layers 4 8 --steps 4

Synthetic examples (binllm.benchmarks.synthetic) as full prompts with binary codes and --history titles, the LLM of
--model (or a random one of --shape), bf16 autocast as the demo tunes. Paths, each an AdamW step per
micro-batch of tune.stage2.micro_batch_size rows through the tuning code's own loss (binllm.tune.StageTask):
- every: LoRA on every layer (the demo before this change);
- top N: LoRA on the last N layers, no cache;
- top N cached, epoch 1: the same with tune.cache_trunk, each prompt's trunk computed in the step;
- top N cached, epoch 2: the same rows again, the trunk read from the cache.
Each path runs one untimed warm-up micro-batch, then --steps timed ones; rows/s and the ratio to "every".
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
from binllm.llm import answer_tokens, apply_lora, load_causal_lm
from binllm.llm.trunk import TrunkCache
from binllm.train.backend import LocalBackend
from binllm.train.micro_batches import train_micro_batches
from binllm.tune import StageTask, split_rows, tokenize_rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="Hugging Face model folder (default: random weights of --shape)")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--top-layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=4, help="timed micro-batches per path")
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def _model(args, cfg, top_layers: int, work: str):
    folder = args.model or random_llm_folder(Path(work, "model"), args.shape)
    model, tokenizer = load_causal_lm(folder, dtype="float32")
    lora = cfg.tune.lora
    torch.manual_seed(cfg.run.seed)
    model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                       top_layers=top_layers).train()
    return model, tokenizer


def _timed(task: StageTask, model, batches: list[np.ndarray]) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = 0.0
    for index, rows in enumerate(batches):
        started = time.perf_counter()
        task.loss(model, rows, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:
            seconds += time.perf_counter() - started
    return seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(None, ["tune.mode=intuitive", f"data.history_len={args.history}", "prompt.code_format=binary",
                             "tune.autocast=bfloat16", "tune.stage2.micro_batch_size=16", *args.overrides])
    stage, seed = cfg.tune.stage2, cfg.run.seed
    examples, items, user_codes, item_codes = synthetic_tables(200, 400, 2000, args.history, seed)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="binllm-bench-") as work:
        model, tokenizer = _model(args, cfg, 0, work)
        train, prompt = tokenize_rows(split_rows(examples, "train", 0, seed), items, user_codes, item_codes,
                                      cfg.prompt, "full", tokenizer)
        answer = answer_tokens(tokenizer, prompt, cfg.llm.answer, cfg.llm.negative_answer)
        backend = LocalBackend(torch.device("cpu"))
        batches = train_micro_batches(train.lengths, backend, stage.micro_batch_size, 1, seed, 0)[: args.steps + 1]
        rows = sum(len(b) for b in batches[1:])
        tokens = sum(int(train.lengths[b].sum()) for b in batches[1:])

        def task(trunks=None) -> StageTask:
            return StageTask(backend, train, train, stage, answer, tokenizer.pad_token_id, seed, torch.bfloat16,
                              trunks=trunks)

        results["every"] = _timed(task(), model, batches)
        for top in args.top_layers:
            model, _ = _model(args, cfg, top, work)
            results[f"top {top}"] = _timed(task(), model, batches)
            trunk = TrunkCache(model, train.token_ids, tokenizer.pad_token_id, torch.bfloat16)
            cached = task((trunk, trunk))
            results[f"top {top} cached, epoch 1"] = _timed(cached, model, batches)
            results[f"top {top} cached, epoch 2"] = _timed(cached, model, batches)
    print(f"LoRA tuning paths, {args.model or args.shape}, bf16 autocast, {torch.get_num_threads()} threads: "
          f"{args.steps} micro-batches of {stage.micro_batch_size} prompts, {tokens / rows:.0f} tokens per prompt")
    for name, seconds in results.items():
        print(f"  {name:24s} {rows / seconds:6.2f} prompts/s  {tokens / seconds:7,.0f} tokens/s  "
              f"{results['every'] / seconds:5.2f}x")


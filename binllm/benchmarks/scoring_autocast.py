"""LLM scoring in float32 against bf16 autocast over the same float32 weights (score.autocast), one run.

    python -m jobs.benchmark_scoring_autocast --model ~/.cache/binllm/models/SmolLM2-135M-Instruct
    python -m jobs.benchmark_scoring_autocast --model <folder> --adapter runs/<run>/adapter --rows 400

Synthetic test rows (binllm.benchmarks.synthetic: 10 history titles, random binary codes) as full prompts, scored
by the shared-prefix scorer in float32, then under bf16 autocast, then in float32 again (so that a warming
machine does not favour the second path); prints rows/s of each, the speed ratio, and how the autocast scores
rank against float32 (Spearman; with --adapter, the tuned model's scores).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from binllm.benchmarks.synthetic import synthetic_tables
from binllm.config import load_config
from binllm.llm import answer_tokens, load_adapter, load_causal_lm, score_prompts
from binllm.prompts import build_prompts
from binllm.tune import split_rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--adapter", default="", help="a PEFT adapter folder to score with (default: none)")
    parser.add_argument("--rows", type=int, default=96)
    args = parser.parse_args(argv)
    cfg = load_config(None, ["prompt.code_format=binary"])
    examples, items, user_codes, item_codes = synthetic_tables(200, 400, 2000, 10, 0)
    model, tokenizer = load_causal_lm(args.model, dtype="float32")
    if args.adapter:
        model = load_adapter(model, args.adapter)
    rows = split_rows(examples, "test", args.rows, 0)
    prompts = build_prompts(rows, items, user_codes, item_codes, cfg.prompt, tokenizer=tokenizer)
    answer = answer_tokens(tokenizer, prompts.texts[0], cfg.llm.answer, cfg.llm.negative_answer)
    scores, seconds = {}, {}
    for name, autocast in (("float32", None), ("bf16 autocast", torch.bfloat16), ("float32 again", None)):
        started = time.perf_counter()
        scores[name] = score_prompts(model, tokenizer, prompts.prefix, prompts.suffix, answer_id=answer,
                                     autocast=autocast)
        seconds[name] = time.perf_counter() - started
    fp32 = min(seconds["float32"], seconds["float32 again"])
    print(f"scoring {rows.num_rows} prompts, {torch.get_num_threads()} threads, "
          f"{'adapter ' + args.adapter if args.adapter else 'no adapter'}")
    for name, s in seconds.items():
        print(f"  {name:14s} {rows.num_rows / s:6.2f} rows/s")
    print(f"  bf16 autocast / float32 (faster of the two runs): {fp32 / seconds['bf16 autocast']:.2f}x; "
          f"Spearman {spearman(scores['bf16 autocast'], scores['float32']):.4f}, max |difference| "
          f"{np.abs(scores['bf16 autocast'] - scores['float32']).max():.4f}, score spread (std) "
          f"{scores['float32'].std():.4f}")


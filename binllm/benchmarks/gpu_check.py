"""The prepared GPU check: exactness of both scoring paths against a float32 reference, scoring speed at
real shapes (binllm.benchmarks.scoring), and one-process LoRA tuning speed (binllm.benchmarks.throughput).
One JSON line per figure; a section that fails prints an {"section": ..., "error": ...} line and the others
still run.

    python -m jobs.gpu_check --model <HF folder> --examples runs/paper-ml1m        # on one GPU
    python -m jobs.gpu_check --device cpu --model <tiny folder> --sections exactness  # the tool on CPU

exactness: 256 users x 20 candidates (real histories, titles and codes from a prepared run, or synthetic
prompts without --examples), scored by the full-prompt and the shared-prefix path in the model's compute
dtype, against the full path in float32 with TF32 off (the reference). For each variant: max and mean
absolute error, Pearson r, and the mean per-user Spearman rank correlation against the reference.
The "bf16 head" variants reproduce the old scorer, which projected onto the answer row in bf16.
Results: docs/gpu_check.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from binllm import sources
from binllm.benchmarks import scoring
from binllm.benchmarks.synthetic import random_llm_folder, write_synthetic_inputs
from binllm.benchmarks.throughput import tune_locally
from binllm.codes import code_table
from binllm.config import PromptConfig, RunLayout, load_config
from binllm.llm import answer_tokens, forward, load_causal_lm, score_prompts
from binllm.prompts import build_prompts

SECTIONS = ("exactness", "scoring", "tuning")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# --- exactness ------------------------------------------------------------------------------------------
def ranked(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    return ranks


def per_user_spearman(scores: np.ndarray, reference: np.ndarray, groups: np.ndarray) -> float:
    values = []
    for g in np.unique(groups):
        rows = groups == g
        if rows.sum() < 3 or np.ptp(reference[rows]) == 0:
            continue
        values.append(np.corrcoef(ranked(scores[rows]), ranked(reference[rows]))[0, 1])
    return float(np.mean(values)) if values else float("nan")


def compare(name: str, scores: np.ndarray, reference: np.ndarray, groups: np.ndarray) -> dict:
    diff = np.abs(scores.astype(np.float64) - reference)
    return {"section": "exactness", "variant": name, "max_abs_err": float(diff.max()),
            "mean_abs_err": float(diff.mean()), "pearson": float(np.corrcoef(scores, reference)[0, 1]),
            "per_user_spearman": per_user_spearman(scores, reference, groups),
            "reference_spread": float(reference.std())}


def run_layout(run_dir: str) -> RunLayout:
    """The standard places (examples/, codes/) of a prepared run folder."""
    path = Path(run_dir).resolve()
    return load_config(None, [f"run.output_root={path.parent}", f"run.name={path.name}"]).layout()


def exactness_prompts(examples_dir: str | None, users: int, candidates: int, seed: int = 0):
    """(prefixes, suffixes, user index per pair) of users x candidates full prompts with dotted codes:
    test users' real histories, titles and codes from a prepared run, or synthetic ones."""
    rng = np.random.default_rng(seed)
    if examples_dir:
        layout = run_layout(examples_dir)
        examples, items = sources.read_examples(layout)
        user_codes, item_codes = sources.read_code_tables(layout)
        test = examples.filter(pc.equal(examples.column("split"), "test")).to_pylist()
        first = {}
        for row in test:
            first.setdefault(row["user_id"], row["history"])
        chosen = rng.permutation(sorted(first))[:users]
        histories = [(u, first[u]) for u in chosen.tolist()]
        item_pool = item_codes.column("id").to_pylist()
    else:
        item_pool = [f"i{k}" for k in range(400)]
        items = pa.table({"item_id": item_pool, "title": [f"Movie number {k} ({1950 + k % 60})" for k in range(400)]})
        user_codes = code_table([f"u{k}" for k in range(users)], rng.integers(0, 256, (users, 4), dtype=np.uint8))
        item_codes = code_table(item_pool, rng.integers(0, 256, (400, 4), dtype=np.uint8))
        histories = [(f"u{k}", [item_pool[j] for j in rng.choice(400, 10, replace=False)]) for k in range(users)]
    pairs = pa.table({
        "user_id": [u for u, _ in histories for _ in range(candidates)],
        "item_id": [item_pool[j] for j in rng.integers(0, len(item_pool), len(histories) * candidates)],
        "history": pa.array([h for _, h in histories for _ in range(candidates)], pa.list_(pa.string())),
    })
    # Both scoring paths get the same prompts: no token caps needed (and no tokenizer) to compare them.
    prompts = build_prompts(pairs, items, user_codes, item_codes,
                            PromptConfig(kind="full", code_format="dotted", max_title_tokens=0, max_tokens=0))
    groups = np.repeat(np.arange(len(histories)), candidates)
    return prompts.prefix, prompts.suffix, groups


@contextlib.contextmanager
def bf16_answer_head():
    """The scorer as it was: the answer row projected in the model's dtype, output rounded to it."""
    original = forward.AnswerHead.__call__

    def rounded(self, hidden):
        weight = self.weight.to(hidden.dtype)
        logits = (hidden @ weight.T).float()
        return logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]

    forward.AnswerHead.__call__ = rounded
    try:
        yield
    finally:
        forward.AnswerHead.__call__ = original


def run_exactness(args) -> None:
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fast_dtype = "bfloat16" if device == "cuda" else "float32"
    ref_model, tokenizer = load_causal_lm(args.model, dtype="float32", device=device)
    prefixes, suffixes, groups = exactness_prompts(args.examples, args.users, args.candidates)
    answer = answer_tokens(tokenizer, prefixes[0] + suffixes[0])
    yes_only = answer.yes

    def score(model, shared, ans=answer):
        started = time.perf_counter()
        out = score_prompts(model, tokenizer, prefixes, suffixes, answer_id=ans, shared_prefix=shared,
                            max_batch_tokens=args.max_batch_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - started

    reference, _ = score(ref_model, False)
    reference_yes, _ = score(ref_model, False, yes_only)
    emit({"section": "exactness", "pairs": len(prefixes), "users": int(groups.max()) + 1,
          "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": args.model,
          "mean_prefix_chars": float(np.mean([len(p) for p in prefixes]))})
    shared32, _ = score(ref_model, True)
    emit(compare("float32 shared vs float32 full", shared32, reference, groups))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        for shared in (False, True):
            scores, seconds = score(ref_model, shared)
            emit({**compare(f"float32 with TF32 {'shared' if shared else 'full'}", scores, reference, groups),
                  "seconds": seconds})
        torch.backends.cuda.matmul.allow_tf32 = False
    del ref_model
    fast, _ = load_causal_lm(args.model, dtype=fast_dtype, device=device)
    for shared in (False, True):
        path = "shared" if shared else "full"
        scores, seconds = score(fast, shared)
        emit({**compare(f"{fast_dtype} {path} (yes - no, fp32 head)", scores, reference, groups), "seconds": seconds})
        scores, _ = score(fast, shared, yes_only)
        emit(compare(f"{fast_dtype} {path} (raw yes, fp32 head)", scores, reference_yes, groups))
        with bf16_answer_head():
            scores, _ = score(fast, shared, yes_only)
        emit(compare(f"{fast_dtype} {path} (raw yes, {fast_dtype} head: the old scorer)", scores, reference_yes,
                     groups))


# --- scoring speed --------------------------------------------------------------------------------------
def run_scoring(args) -> None:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak = scoring.matmul_peak_flops(args.device, dtype)
    emit({"section": "scoring", "peak_tflops": round(peak / 1e12, 1)})
    for name, budgets in args.scoring_cases:
        for budget, row_tokens in budgets:
            opts = argparse.Namespace(device=args.device, repeats=args.repeats, max_batch_tokens=budget,
                                      max_row_tokens=row_tokens)
            record = scoring.run_case(scoring.parse_case(name), opts, peak, dtype)
            emit({"section": "scoring", **{k: record[k] for k in (
                "case", "device", "full_pairs_per_s", "shared_pairs_per_s", "speedup", "shared_flop_fraction",
                "shared_pairs_per_s_ceiling", "shared_peak_mem_mb", "max_abs_score_diff", "max_batch_tokens",
                "max_row_tokens")}})
            if args.device == "cuda":
                torch.cuda.empty_cache()


# --- tuning speed ---------------------------------------------------------------------------------------
def run_tuning(args) -> None:
    for label, overrides in args.tuning_cases:
        with tempfile.TemporaryDirectory(prefix="binllm-gpu-tune-") as work:
            cfg = load_config(None, [
                f"run.output_root={work}/runs", "run.name=bench", "tune.mode=intuitive", "data.history_len=10",
                f"tune.stage2.max_steps={args.tune_steps}", "tune.stage2.max_valid_rows=16",
                "tune.stage2.warmup_ratio=0.0", "llm.dtype=bfloat16" if args.device == "cuda" else "llm.dtype=float32",
                *overrides])
            write_synthetic_inputs(cfg, n_users=2000, n_items=1000, n_rows=args.tune_rows)
            model_dir = random_llm_folder(f"{work}/model", args.tune_shape)
            tput = tune_locally(cfg, model_dir)
            emit({"section": "tuning", "case": label, "shape": args.tune_shape, "runner": "one process",
                  "tokens_per_s": round(tput.per_second), "tokens": tput.items,
                  "padding_share": round(1 - tput.items / max(tput.padded_tokens, 1), 3), "steps": tput.steps,
                  "seconds": round(tput.seconds, 2), "peak_memory_gib": round(tput.peak_memory_gib, 2)})
            if args.device == "cuda":
                torch.cuda.empty_cache()


GPU_SCORING = [
    ("smollm2-135m-u256-c20-dotted", [(32768, 256), (131072, 1024)]),
    ("llama-7b-u32-c20-dotted", [(65536, 1024)]),
    ("llama-7b-u8-c100-dotted", [(65536, 1024)]),
]
CPU_SCORING = [("tiny-u8-c20-dotted", [(8192, 256)])]
GPU_TUNING = [("micro-batch 128 rows", ["tune.stage2.micro_batch_size=128"]),
              ("token budget from free memory", ["tune.stage2.micro_batch_tokens=-1"])]
CPU_TUNING = [("micro-batch 8 rows", ["tune.stage2.micro_batch_size=8"]),
              ("token budget 1024", ["tune.stage2.micro_batch_tokens=1024"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {list(SECTIONS)}")
    parser.add_argument("--model", help="Hugging Face folder of the real model (exactness)")
    parser.add_argument("--examples", default=None, help="a prepared run folder (examples/, codes/) for real prompts")
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--tune-shape", default=None)
    parser.add_argument("--tune-steps", type=int, default=None)
    parser.add_argument("--tune-rows", type=int, default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    args.max_batch_tokens = args.max_batch_tokens or (65536 if cuda else 4096)
    args.repeats = args.repeats or (3 if cuda else 1)
    args.tune_shape = args.tune_shape or ("smollm2-135m" if cuda else "tiny")
    args.tune_steps = args.tune_steps or (20 if cuda else 3)
    args.tune_rows = args.tune_rows or (30000 if cuda else 400)
    args.scoring_cases = GPU_SCORING if cuda else CPU_SCORING
    args.tuning_cases = GPU_TUNING if cuda else CPU_TUNING
    failed = False
    for section in args.sections.split(","):
        if section not in SECTIONS:
            parser.error(f"unknown section {section!r}; expected some of {list(SECTIONS)}")
        if section == "exactness" and not args.model:
            parser.error("section exactness needs --model")
        started = time.perf_counter()
        try:
            {"exactness": run_exactness, "scoring": run_scoring, "tuning": run_tuning}[section](args)
        except Exception as exc:  # one section's failure must not cost the others their figures
            failed = True
            traceback.print_exc()
            emit({"section": section, "error": f"{type(exc).__name__}: {exc}"})
        emit({"section": section, "seconds": round(time.perf_counter() - started, 1)})
    sys.exit(1 if failed else 0)


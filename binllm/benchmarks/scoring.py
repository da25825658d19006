"""Full-prompt vs shared-prefix scoring at real model shapes with random weights.

    python -m jobs.benchmark_scoring [--device cpu|cuda] [--cases NAME,NAME,...] [--list]

Prints one JSON line per case. Token ids are synthetic, of the lengths a BinLLM prompt has with the
digit-per-token tokenizers (LLaMA, SmolLM2): binary codes cost 33 tokens, dotted codes 15, so a
dotted prompt is 18 tokens shorter in the prefix (user code) and 18 in the suffix (item code).
Results: docs/scoring_benchmark.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from binllm.benchmarks.shapes import SHAPES
from binllm.llm.scoring import DEFAULT_MAX_ROW_TOKENS, score_encoded
from binllm.llm.tokens import EncodedPrompts


BINARY_PREFIX, BINARY_SUFFIX = 161, 41  # reference prompt lengths with 32-bit binary codes
CODE_SAVING = 33 - 15  # tokens saved per code by the dotted form


@dataclass(frozen=True)
class Case:
    name: str
    shape: str
    users: int
    candidates: int
    codes: str  # "binary" or "dotted"

    @property
    def prefix_len(self) -> int:
        return BINARY_PREFIX - (CODE_SAVING if self.codes == "dotted" else 0)

    @property
    def suffix_len(self) -> int:
        return BINARY_SUFFIX - (CODE_SAVING if self.codes == "dotted" else 0)


def _case(shape: str, users: int, candidates: int, codes: str) -> Case:
    return Case(f"{shape}-u{users}-c{candidates}-{codes}", shape, users, candidates, codes)


CPU_CASES = [
    _case("tiny", 8, 20, "binary"),
    _case("smollm2-135m", 4, 1, "binary"),
    _case("smollm2-135m", 1, 20, "binary"),
    _case("smollm2-135m", 1, 20, "dotted"),
]
CUDA_CASES = [
    _case("smollm2-135m", 256, 20, "binary"),
    _case("smollm2-135m", 256, 20, "dotted"),
    _case("smollm2-135m", 64, 100, "dotted"),
    _case("llama-7b", 16, 1, "binary"),
    _case("llama-7b", 32, 20, "binary"),
    _case("llama-7b", 32, 20, "dotted"),
    _case("llama-7b", 8, 100, "binary"),
    _case("llama-7b", 8, 100, "dotted"),
]


def parse_case(name: str) -> Case:
    """'<shape>-u<users>-c<candidates>-<binary|dotted>', e.g. smollm2-135m-u2-c20-dotted."""
    parts = name.rsplit("-", 3)
    if len(parts) != 4 or parts[0] not in SHAPES or parts[3] not in ("binary", "dotted") \
            or not parts[1][1:].isdigit() or not parts[2][1:].isdigit() or parts[1][0] != "u" or parts[2][0] != "c":
        raise ValueError(f"bad case {name!r}: expected <shape>-u<users>-c<candidates>-<binary|dotted> "
                         f"with shape in {sorted(SHAPES)}")
    return _case(parts[0], int(parts[1][1:]), int(parts[2][1:]), parts[3])


def build_model(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def non_embedding_params(model: LlamaForCausalLM) -> int:
    return sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()


def synthetic_prompts(case: Case, vocab: int, seed: int = 0) -> EncodedPrompts:
    rng = np.random.default_rng(seed)
    token = lambda n: rng.integers(10, vocab, size=n).tolist()  # noqa: E731
    return EncodedPrompts(
        prefix_ids=[token(case.prefix_len) for _ in range(case.users)],
        suffix_ids=[token(case.suffix_len) for _ in range(case.users * case.candidates)],
        pair_prefix=np.repeat(np.arange(case.users), case.candidates),
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory while the block runs, weights included: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: str):
        self.device, self.peak_bytes = device, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.high, self.stop = _rss_bytes(), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.high = max(self.high, _rss_bytes())

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
            self.peak_bytes = max(self.high, _rss_bytes())


def matmul_peak_flops(device: str, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s: the practical ceiling on this device."""
    n = 8192 if device == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@dataclass
class Timing:
    scores: np.ndarray | None = None
    wall_s: float = float("inf")
    cpu_s: float = float("inf")  # process CPU time: robust to other processes on a shared CPU
    peak_bytes: int = 0


def time_paths(model, encoded, *, device: str, args) -> dict[bool, Timing]:
    """Full-prompt and shared-prefix runs, interleaved `repeats` times; the best time of each is kept."""
    timings = {False: Timing(), True: Timing()}
    for _ in range(args.repeats):
        for shared, timing in timings.items():
            with PeakMemory(device) as peak:
                wall, cpu = time.perf_counter(), time.process_time()
                timing.scores = score_encoded(
                    model, encoded, answer_id=7, pad_id=0, shared_prefix=shared,
                    max_batch_tokens=args.max_batch_tokens, max_row_tokens=args.max_row_tokens,
                )
                if device == "cuda":
                    torch.cuda.synchronize()
                timing.wall_s = min(timing.wall_s, time.perf_counter() - wall)
                timing.cpu_s = min(timing.cpu_s, time.process_time() - cpu)
            timing.peak_bytes = max(timing.peak_bytes, peak.peak_bytes)
    return timings


def run_case(case: Case, args, peak_flops: float, dtype: torch.dtype) -> dict:
    model = build_model(case.shape, args.device, dtype)
    params = non_embedding_params(model)
    encoded = synthetic_prompts(case, model.config.vocab_size)
    pairs = len(encoded)
    warmup = EncodedPrompts(encoded.prefix_ids[:1], encoded.suffix_ids[:2], np.zeros(2, dtype=np.int64))
    for shared in (False, True):
        score_encoded(model, warmup, answer_id=7, pad_id=0, shared_prefix=shared)
    timings = time_paths(model, encoded, device=args.device, args=args)
    full, shared = timings[False], timings[True]
    full_tokens = pairs * (case.prefix_len + case.suffix_len)
    shared_tokens = case.users * case.prefix_len + pairs * case.suffix_len
    flops = lambda tokens, seconds: 2 * params * tokens / seconds  # noqa: E731
    return {
        "case": case.name,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": case.shape,
        "non_embedding_params": params,
        "users": case.users,
        "candidates_per_user": case.candidates,
        "codes": case.codes,
        "prefix_len": case.prefix_len,
        "suffix_len": case.suffix_len,
        "full_pairs_per_s": round(pairs / full.wall_s, 2),
        "shared_pairs_per_s": round(pairs / shared.wall_s, 2),
        "speedup": round(full.wall_s / shared.wall_s, 2),
        "full_cpu_s": round(full.cpu_s, 2),
        "shared_cpu_s": round(shared.cpu_s, 2),
        "speedup_cpu_time": round(full.cpu_s / shared.cpu_s, 2),
        "full_flop_fraction": round(flops(full_tokens, full.wall_s) / peak_flops, 3),
        "shared_flop_fraction": round(flops(shared_tokens, shared.wall_s) / peak_flops, 3),
        "shared_pairs_per_s_ceiling": round(peak_flops / (2 * params * shared_tokens / pairs), 1),
        "full_peak_mem_mb": round(full.peak_bytes / 2**20, 1),
        "shared_peak_mem_mb": round(shared.peak_bytes / 2**20, 1),
        "max_abs_score_diff": float(np.abs(full.scores - shared.scores).max()),
        "max_batch_tokens": args.max_batch_tokens,
        "max_row_tokens": args.max_row_tokens,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cases", help="comma-separated case names (default: the device's preset list)")
    parser.add_argument("--list", action="store_true", help="print the preset case names and exit")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default 8192 on cpu, 32768 on cuda")
    parser.add_argument("--max-row-tokens", type=int, default=DEFAULT_MAX_ROW_TOKENS)
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved timed runs per path, best kept (cpu 2, cuda 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="FLOP ceiling in TFLOP/s (default: measured dense matmul on the device)")
    args = parser.parse_args(argv)
    presets = CPU_CASES if args.device == "cpu" else CUDA_CASES
    if args.list:
        print("\n".join(c.name for c in presets))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cases = [parse_case(n) for n in args.cases.split(",")] if args.cases else presets
    if args.device == "cpu" and any(c.shape == "llama-7b" for c in cases):
        parser.error("the llama-7b shape runs only with --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.max_batch_tokens = args.max_batch_tokens or (8192 if args.device == "cpu" else 32768)
    args.repeats = args.repeats or (2 if args.device == "cpu" else 3)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak_flops(args.device, dtype)
    print(json.dumps({"peak_flops_tflops": round(peak / 1e12, 4), "device": args.device,
                      "load_average_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(),
                      "max_rss_mb_at_start": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}),
          flush=True)
    for case in cases:
        print(json.dumps(run_case(case, args, peak, dtype)), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()


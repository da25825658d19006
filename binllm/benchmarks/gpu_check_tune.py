"""GPU check of LoRA tuning: one Ray Train worker on one GPU, DeepSpeed ZeRO-2, bf16, SmolLM2-135M shape.

    python -m jobs.gpu_check_tune                         # prints tokens/s and peak GPU memory
    python -m jobs.gpu_check_tune --set tune.stage2.micro_batch_size=64 --steps 30

Random weights at the SmolLM2-135M shape and synthetic prompts (history of 10 titles): the throughput
does not depend on the weights. These defaults go to binllm.benchmarks.training, any extra arguments after
them (later ones win). Goal: >= 150k tokens/s.
"""
from __future__ import annotations

import sys

import torch

from binllm.benchmarks import training

GPU_DEFAULTS = [
    "--runner", "ray", "--shape", "smollm2-135m", "--steps", "20", "--encoder-rows", "0",
    "--set", "distributed.num_workers=1", "--set", "distributed.use_gpu=true", "--set", "distributed.zero_stage=2",
    "--set", "llm.dtype=bfloat16", "--set", "tune.stage2.micro_batch_size=32",
]


def main(argv: list[str] | None = None) -> None:
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible; this check needs one GPU (see docs/training_benchmark.md)")
    training.main(GPU_DEFAULTS + list(sys.argv[1:] if argv is None else argv), description=__doc__)

"""Benchmark: the Ray Data scoring pipeline against a plain Python loop over the same pairs and model,
and top-K candidate generation by Hamming distance.

    python -m jobs.benchmark_pipeline [--users 64] [--candidates 20] [--model HF_FOLDER] [--threads 2]
                                      [--cand-users 100000] [--cand-items 100000] [--skip-pipeline]

Prints one JSON line per measurement. Without --model, a randomly initialised LLaMA (hidden 256, 4 layers)
with the tiny test tokenizer stands in for the LLM; a LoRA adapter with random weights is applied either way.
"""
from __future__ import annotations

from binllm.benchmarks import pipeline


def main(argv: list[str] | None = None) -> None:
    pipeline.main(argv, description=__doc__)


if __name__ == "__main__":
    main()

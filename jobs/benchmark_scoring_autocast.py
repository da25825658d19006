"""LLM scoring in float32 against bf16 autocast over the same float32 weights (score.autocast), one run.

    python -m jobs.benchmark_scoring_autocast --model ~/.cache/binllm/models/SmolLM2-135M-Instruct
    python -m jobs.benchmark_scoring_autocast --model <folder> --adapter runs/<run>/adapter --rows 400

The benchmark is binllm/benchmarks/scoring_autocast.py (its docstring: what it measures).
"""
from binllm.benchmarks.scoring_autocast import main

if __name__ == "__main__":
    main()

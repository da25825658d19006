"""LoRA tuning speed with a frozen-trunk cache against today's paths, in one run on the same micro-batches.

    python -m jobs.benchmark_trunk_cache_training --model ~/.cache/binllm/models/SmolLM2-135M-Instruct
    python -m jobs.benchmark_trunk_cache_training --shape smollm2-135m --top-layers 4 8 --steps 4

The benchmark is binllm/benchmarks/trunk_cache_training.py (its docstring: what it measures).
"""
from binllm.benchmarks.trunk_cache_training import main

if __name__ == "__main__":
    main()

"""Shared-prefix vs full-prompt LoRA tuning steps, measured in one run on the same micro-batches.

    python -m jobs.benchmark_shared_prefix_training --shape smollm2-135m --steps 6 --threads 1
    python -m jobs.benchmark_shared_prefix_training --set tune.stage2.micro_batch_tokens=4096

The benchmark is binllm/benchmarks/shared_prefix_training.py (its docstring: what it measures and the figures).
"""
from binllm.benchmarks.shared_prefix_training import main

if __name__ == "__main__":
    main()

"""GPU check of LoRA tuning: one Ray Train worker on one GPU, DeepSpeed ZeRO-2, bf16, SmolLM2-135M shape.

    python -m jobs.gpu_check_tune                         # prints tokens/s and peak GPU memory
    python -m jobs.gpu_check_tune --set tune.stage2.micro_batch_size=64 --steps 30

Extra arguments go to binllm.benchmarks.training after the check's defaults (binllm/benchmarks/gpu_check_tune.py).
Goal: >= 150k tokens/s; results: docs/training_benchmark.md.
"""
from binllm.benchmarks.gpu_check_tune import main
from binllm.cli import setup_logging

if __name__ == "__main__":
    setup_logging()
    main()

"""Training throughput: LoRA tuning tokens/s and peak memory, encoder pretraining samples/s.

    python -m jobs.benchmark_training --shape smollm2-135m --steps 4            # this process, CPU or GPU
    python -m jobs.benchmark_training --runner ray --set distributed.num_workers=2 --set distributed.zero_stage=3
    python -m jobs.benchmark_training --set tune.stage2.micro_batch_size=32 --set llm.dtype=bfloat16

The benchmark is binllm/benchmarks/training.py; results: docs/training_benchmark.md.
"""
from binllm.benchmarks.training import main
from binllm.cli import setup_logging

if __name__ == "__main__":
    setup_logging()
    main()

"""Training throughput: LoRA tuning tokens/s and peak memory, encoder pretraining samples/s.

    python -m jobs.benchmark_training --shape smollm2-135m --steps 4            # this process, CPU or GPU
    python -m jobs.benchmark_training --runner ray --set distributed.num_workers=2 --set distributed.zero_stage=3
    python -m jobs.benchmark_training --set tune.stage2.micro_batch_size=32 --set llm.dtype=bfloat16

Synthetic data and a random-weight LLM of the named shape (no downloads); tuning settings come from the
config (tune.stage2.*: micro_batch_size, grad_accum; distributed.*; llm.dtype). Results: docs/training_benchmark.md.
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from jobs.bench import training

    training.main(argv, description=__doc__)


if __name__ == "__main__":
    main()

"""Full-prompt vs shared-prefix scoring at real model shapes with random weights; one JSON line per case.

    python -m jobs.benchmark_scoring [--device cpu|cuda] [--cases NAME,NAME,...] [--list]
    python -m jobs.benchmark_scoring --device cpu --threads 1     # the CPU presets

The benchmark is binllm/benchmarks/scoring.py; results: docs/scoring_benchmark.md.
"""
from binllm.benchmarks.scoring import main

if __name__ == "__main__":
    main()

"""Stage-2 tuning variants (config overrides) on the same prompts: validation AUC per prompts tuned.

    python -m jobs.benchmark_tuning_variants --prompts 960 --valid-rows 600 \
        --variant labels --variant distill tune.stage2.distill=0.5

The benchmark is binllm/benchmarks/tuning_variants.py (its docstring: what it measures).
"""
from binllm.benchmarks.tuning_variants import main

if __name__ == "__main__":
    main()

"""Tuning variants at an equal number of prompts on the demo's data: prompts/s and validation AUC, one run.

    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 640 --valid-rows 1000
    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 480 --valid-rows 600 --top-layers 8
    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 1000 --epochs 3 --valid-rows 640 --top-dropout 0 \
        --set tune.stage2.distill=0.9 --set tune.stage2.distill_teacher=code_bits          # session 29: the demo's stage 2
    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 1000 --epochs 3 --valid-rows 640 \
        --variant top=4,dropout=0,lr=0.004 --variant top=8,dropout=0,lr=0.004 \
        --set tune.stage2.distill=0.9 --set tune.stage2.distill_teacher=code_bits          # session 30: higher lr
    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 16 --valid-rows 16 --top-layers 8 \
        --set encoder.max_epochs=1 --output-root /tmp/runs                                # a quick smoke run

The benchmark is binllm/benchmarks/tuning_at_equal_prompts.py (its docstring: what it measures).
"""
from binllm.benchmarks.tuning_at_equal_prompts import main

if __name__ == "__main__":
    main()

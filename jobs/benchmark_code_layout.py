"""The user code's place in the full prompt (paper | adjacent to the item code): validation AUC per prompts tuned.

    python -m jobs.benchmark_code_layout --prompts 960 --valid-rows 1000
    python -m jobs.benchmark_code_layout --prompts 16 --valid-rows 16 --set encoder.max_epochs=1 --output-root /tmp/runs

The benchmark is binllm/benchmarks/code_layout.py (its docstring: what it measures).
"""
from binllm.benchmarks.code_layout import main

if __name__ == "__main__":
    main()

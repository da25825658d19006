"""The prepared GPU check: exactness of both scoring paths against a float32 reference, scoring speed at
real shapes, and one-process LoRA tuning speed. One JSON line per figure; sections that fail print an
{"section": ..., "error": ...} line and the others still run.

    python -m jobs.gpu_check --model <HF folder> --examples runs/paper-ml1m        # on one GPU
    python -m jobs.gpu_check --device cpu --model <tiny folder> --sections exactness  # the tool on CPU

The check is binllm/benchmarks/gpu_check.py; results: docs/gpu_check.md.
"""
from binllm.benchmarks.gpu_check import main
from binllm.cli import setup_logging

if __name__ == "__main__":
    setup_logging()
    main()

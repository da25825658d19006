"""Benchmarks (training, scoring, the pipeline, the GPU check), started by jobs/benchmark_*.py and jobs/gpu_check*."""

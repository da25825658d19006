"""Benchmark and GPU-check implementations behind the thin `jobs.benchmark_*` and `jobs.gpu_check*` entry
modules; they sit outside the binllm library on purpose (binllm holds no benchmark code)."""

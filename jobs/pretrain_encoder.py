"""Pretrain the binary encoder (MF + hashing layer) on Ray Train + DeepSpeed; writes the code tables.

    python -m jobs.pretrain_encoder --config ray_config.yaml [--config PRESET.yaml] [--set key=value ...]

The same as `binllm pretrain_encoder ...`; the recipe is binllm/recipes/pretrain_encoder.py (`--help` lists its config sections).
"""
from binllm.cli import run_recipe
from binllm.recipes import pretrain_encoder

if __name__ == "__main__":
    run_recipe(pretrain_encoder)

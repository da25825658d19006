"""Prepare: interactions + catalog -> labelled, time-split examples with histories and warm flags.

    python -m jobs.prepare --config ray_config.yaml [--config PRESET.yaml] [--set key=value ...]

The same as `binllm prepare ...`; the recipe is binllm/recipes/prepare.py (`--help` lists its config sections).
"""
from binllm.cli import run_recipe
from binllm.recipes import prepare

if __name__ == "__main__":
    run_recipe(prepare)

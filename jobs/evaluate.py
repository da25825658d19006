"""Evaluate: AUC / UAUC of every method on the test split, overall and warm/cold.

    python -m jobs.evaluate --config ray_config.yaml [--config PRESET.yaml] [--set key=value ...]

The same as `binllm evaluate ...`; the recipe is binllm/recipes/evaluate.py (`--help` lists its config sections).
"""
from binllm.cli import run_recipe
from binllm.recipes import evaluate

if __name__ == "__main__":
    run_recipe(evaluate)

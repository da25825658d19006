"""The embedded demo: the whole BinLLM chain on one machine, with no cluster and no cloud.

    python -m jobs.demo --config ray_config.yaml [--config PRESET.yaml] [--set key=value ...]

The same as `binllm demo ...`; the recipe is binllm/recipes/demo.py (`--help` lists its config sections).
"""
from binllm.cli import run_recipe
from binllm.recipes import demo

if __name__ == "__main__":
    run_recipe(demo)

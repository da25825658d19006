"""Score (nightly): click scores for explicit (user, item) requests or top-K candidates of active users,

    python -m jobs.score --config ray_config.yaml [--config PRESET.yaml] [--set key=value ...]

The same as `binllm score ...`; the recipe is binllm/recipes/score.py (`--help` lists its config sections).
"""
from binllm.cli import run_recipe
from binllm.recipes import score

if __name__ == "__main__":
    run_recipe(score)

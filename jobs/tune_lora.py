"""Tune LoRA (two-step or intuitive) on Ray Train + DeepSpeed ZeRO; writes the PEFT adapter folder.

    python -m jobs.tune_lora --config ray_config.yaml [--config PRESET.yaml] [--set key=value ...]

The same as `binllm tune_lora ...`; the recipe is binllm/recipes/tune_lora.py (`--help` lists its config sections).
"""
from binllm.cli import run_recipe
from binllm.recipes import tune_lora

if __name__ == "__main__":
    run_recipe(tune_lora)

"""The paper's table on one data set: MF, BinMF, TO, IO, IT and two-step BinLLM, each LLM method with

    python -m jobs.paper_table --config ray_config.yaml [--config PRESET.yaml] [--set key=value ...]

The same as `binllm paper_table ...`; the recipe is binllm/recipes/paper_table.py (`--help` lists its config sections).
"""
from binllm.cli import run_recipe
from binllm.recipes import paper_table

if __name__ == "__main__":
    run_recipe(paper_table)

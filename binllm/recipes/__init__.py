"""One recipe per job: each module owns its job's whole story (read inputs, build, run locally or as a
Ray Train / Ray Data job, publish outputs) in one `main(cfg)`, and names the config sections it reads
(`SECTIONS`). A recipe is the only place besides the cli that sees the whole Config: it hands the library's
parts the sections they use. Recipes never import each other; what several share lives in the library
(binllm.run_steps, binllm.evaluation). `jobs/<name>.py` and the `binllm <name>` command only call `main`."""
from __future__ import annotations

import importlib
from types import ModuleType

RECIPES = ("prepare", "pretrain_encoder", "tune_lora", "score", "evaluate", "paper_table", "demo")


def load_recipe(name: str) -> ModuleType:
    if name not in RECIPES:
        raise KeyError(f"unknown job {name!r}; expected one of {list(RECIPES)}")
    return importlib.import_module(f"binllm.recipes.{name}")

"""Where the user code sits in the full prompt, measured: validation AUC per prompts tuned, one run.

    python -m jobs.benchmark_code_layout --prompts 960 --valid-rows 1000
    python -m jobs.benchmark_code_layout --prompts 16 --valid-rows 16 --set encoder.max_epochs=1 \
        --output-root /tmp/runs                                                          # a quick smoke run

The paper's full prompt puts the user code after the history and the item code after the target title, so the
distance between bit k of the two codes changes with the title's length; the codes-only prompt (IO), where it
is fixed, learned to read the codes from fewer prompts than the full prompt in every CPU profile
(docs/RESULTS.md). prompt.code_layout "adjacent" keeps the paper's words and moves the user code to right after
the item code. Each layout tunes fresh LoRA on the same --prompts full prompts (the demo preset's data, encoder
and stage-2 settings: LoRA on the top 8 layers over the cached trunk, lr 2e-3, 16 prompts a step) and is
validated every --eval-every steps on the same --valid-rows rows; BinMF's AUC on those rows is the reference.
"""
from __future__ import annotations

import argparse
import dataclasses

from binllm import sources
from binllm.config import load_config
from binllm.encoder import export_codes, rows_auc, train_encoder
from binllm.run_steps import prepare_run
from binllm.tune import stage_rows, tune_lora

LAYOUTS = ("paper", "adjacent")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=960)
    parser.add_argument("--valid-rows", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=20, help="optimizer steps between validations")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--output-root", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides after the benchmark's own, e.g. encoder.max_epochs=1 for a quick run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config("ray_config.yaml", [
        "data.format=demo_ml1m", "data.split.kind=months", "tune.mode=intuitive", "tune.cache_trunk=true",
        "tune.lora={top_layers: 8, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}",
        "run.name=bench-code-layout", f"run.output_root={args.output_root}",
        f"tune.stage2={{max_train_rows: {args.prompts}, max_valid_rows: {args.valid_rows}, epochs: {args.epochs}, "
        f"eval_every: {args.eval_every}, patience: 1000}}",
        *args.overrides])
    examples, items = prepare_run(cfg.data, cfg.layout())
    binmf = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)
    user_codes, item_codes = export_codes(binmf)
    _, valid = stage_rows(examples, cfg.tune.stage2, cfg.run.seed)
    reference = rows_auc(binmf, valid)
    print(f"BinMF on the {len(valid)} validation rows: AUC {reference:.4f}", flush=True)
    curves = {}
    for layout in args.layouts:
        model, tokenizer = sources.load_base_model(cfg.llm, cfg.storage)
        prompt = dataclasses.replace(cfg.prompt, code_layout=layout)
        (stage,) = tune_lora(examples, items, user_codes, item_codes, tune=cfg.tune, prompt=prompt, llm=cfg.llm,
                             seed=cfg.run.seed, model=model, tokenizer=tokenizer).stages
        curves[layout] = [(round(h["step"] * stage.prompts_per_step), h["auc"]) for h in stage.history]
        passes_per_second = stage.steps * stage.prompts_per_step / stage.train_seconds
        print(f"{layout}: best validation AUC {stage.best_auc:.4f}, {passes_per_second:.2f} prompts/s; per prompts "
              "tuned: "
              + ", ".join(f"{n}: {a:.4f}" for n, a in curves[layout]), flush=True)
    print(f"\nvalidation AUC against prompts tuned ({len(valid)} rows; BinMF {reference:.4f})")
    for layout, curve in curves.items():
        print(f"  {layout:9s} " + "  ".join(f"{n:>5d}: {a:.4f}" for n, a in curve))

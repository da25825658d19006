"""Stage-2 tuning variants on the same prompts, measured: validation AUC per prompts tuned, one run.

    python -m jobs.benchmark_tuning_variants --prompts 960 --valid-rows 600 \
        --variant labels --variant distill tune.stage2.distill=0.5
    python -m jobs.benchmark_tuning_variants --variant paper --variant adjacent prompt.code_layout=adjacent
    python -m jobs.benchmark_tuning_variants --prompts 16 --valid-rows 16 --set encoder.max_epochs=1 \
        --output-root /tmp/runs                                                          # a quick smoke run

Every variant tunes fresh LoRA on the same --prompts full prompts of the demo's data and BinMF codes (the demo
preset's stage-2 settings: LoRA on the top 8 layers over the cached trunk, lr 2e-3, 16 prompts a step) and is
validated every --eval-every steps on the same --valid-rows rows; BinMF's AUC on those rows is the reference.
A variant is a name and its config overrides of tune.*, prompt.* or llm.* (data and encoder are shared).
"""
from __future__ import annotations

import argparse

from binllm import sources
from binllm.config import ConfigError, load_config
from binllm.encoder import export_codes, rows_auc, train_encoder
from binllm.run_steps import prepare_run
from binllm.tune import stage_rows, tune_lora

VARIANT_SECTIONS = ("tune.", "prompt.", "llm.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=960)
    parser.add_argument("--valid-rows", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=20, help="optimizer steps between validations")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--variant", dest="variants", action="append", nargs="+", metavar="NAME [KEY=VALUE ...]",
                        help="a variant: its name, then its overrides (none: the shared settings); repeatable")
    parser.add_argument("--output-root", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides of every variant, e.g. encoder.max_epochs=1 for a quick run")
    args = parser.parse_args(argv)
    args.variants = args.variants or [["paper"]]
    for name, *overrides in args.variants:
        for item in overrides:
            if not item.startswith(VARIANT_SECTIONS):
                parser.error(f"variant {name!r}: override {item!r} must set a key under "
                             f"{', '.join(VARIANT_SECTIONS)} (the data and the encoder are shared)")
    if len({name for name, *_ in args.variants}) != len(args.variants):
        parser.error("variant names must differ")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shared = [
        "data.format=demo_ml1m", "data.split.kind=months", "tune.mode=intuitive", "tune.cache_trunk=true",
        "tune.lora={top_layers: 8, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}",
        "run.name=bench-tuning-variants", f"run.output_root={args.output_root}",
        f"tune.stage2={{max_train_rows: {args.prompts}, max_valid_rows: {args.valid_rows}, epochs: {args.epochs}, "
        f"eval_every: {args.eval_every}, patience: 1000}}",
        *args.overrides]
    configs = {}
    for name, *overrides in args.variants:
        try:
            configs[name] = load_config("ray_config.yaml", shared + overrides)
        except ConfigError as err:
            raise SystemExit(f"variant {name!r}: {err}") from None
    cfg = next(iter(configs.values()))
    examples, items = prepare_run(cfg.data, cfg.layout())
    binmf = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)
    user_codes, item_codes = export_codes(binmf)
    _, valid = stage_rows(examples, cfg.tune.stage2, cfg.run.seed)
    reference = rows_auc(binmf, valid)
    print(f"BinMF on the {len(valid)} validation rows: AUC {reference:.4f}", flush=True)
    curves = {}
    for name, variant in configs.items():
        model, tokenizer = sources.load_base_model(variant.llm, variant.storage)
        (stage,) = tune_lora(examples, items, user_codes, item_codes, tune=variant.tune, prompt=variant.prompt,
                             llm=variant.llm, seed=variant.run.seed, model=model, tokenizer=tokenizer).stages
        curves[name] = [(round(h["step"] * stage.prompts_per_step), h["auc"]) for h in stage.history]
        passes_per_second = stage.steps * stage.prompts_per_step / stage.train_seconds
        print(f"{name}: best validation AUC {stage.best_auc:.4f}, {passes_per_second:.2f} prompts/s; per prompts "
              "tuned: " + ", ".join(f"{n}: {a:.4f}" for n, a in curves[name]), flush=True)
    print(f"\nvalidation AUC against prompts tuned ({len(valid)} rows; BinMF {reference:.4f})")
    width = max(len(name) for name in curves)
    for name, curve in curves.items():
        print(f"  {name:{width}s} " + "  ".join(f"{n:>5d}: {a:.4f}" for n, a in curve))

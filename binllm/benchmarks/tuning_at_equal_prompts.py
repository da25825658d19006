"""Tuning variants at an equal number of prompts on the demo's data: prompts/s and validation AUC, one run.

    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 640 --valid-rows 1000
    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 16 --valid-rows 16 --top-layers 8 \
        --set encoder.max_epochs=1 --output-root /tmp/runs                                # a quick smoke run

The demo preset's data and encoder (ML-1M, the paper's months, BinMF codes), the real SmolLM2-135M, bf16
autocast; each variant tunes fresh LoRA on the same --prompts full prompts (one epoch, intuitive mode, the
demo's stage-2 lr and schedule) and is validated once, at the end, on the same --valid-rows rows. Variants:
- every layer: LoRA r=8 on q_proj/v_proj of all 30 layers (the demo before the frozen-trunk cache);
- top N cached: LoRA on every projection of the last N layers, the trunk below cached (tune.cache_trunk).
prompts/s counts the stage's wall time without validation; "x" is the ratio to the first variant.
"""
from __future__ import annotations

import argparse
import dataclasses

from binllm import sources
from binllm.config import TuneConfig, load_config
from binllm.encoder import export_codes, train_encoder
from binllm.run_steps import prepare_run
from binllm.tune import tune_lora

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=640)
    parser.add_argument("--valid-rows", type=int, default=1000)
    parser.add_argument("--top-layers", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--output-root", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides after the benchmark's own, e.g. encoder.max_epochs=1 for a quick run")
    return parser.parse_args(argv)


def variant(tune: TuneConfig, top_layers: int) -> TuneConfig:
    lora = (dataclasses.replace(tune.lora, top_layers=0, target_modules=["q_proj", "v_proj"]) if top_layers == 0
            else dataclasses.replace(tune.lora, top_layers=top_layers, target_modules=ALL_PROJECTIONS))
    return dataclasses.replace(tune, lora=lora, cache_trunk=top_layers > 0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config("ray_config.yaml", [
        "data.format=demo_ml1m", "data.split.kind=months", "data.warm_min_train=4", "encoder.vocabulary=all",
        "encoder.shared_mask=true", "prompt.code_format=binary", "tune.mode=intuitive", "tune.autocast=bfloat16",
        "run.name=bench-equal-prompts", f"run.output_root={args.output_root}",
        f"tune.stage2={{lr: 0.002, micro_batch_size: 16, max_train_rows: {args.prompts}, "
        f"max_valid_rows: {args.valid_rows}, epochs: 1, eval_every: 0, warmup_ratio: 0.05, min_lr: 0.0002}}",
        *args.overrides])
    examples, items = prepare_run(cfg.data, cfg.layout())
    binmf = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)
    user_codes, item_codes = export_codes(binmf)
    rows = []
    for top in [0, *args.top_layers]:
        model, tokenizer = sources.load_base_model(cfg.llm, cfg.storage)
        (stage,) = tune_lora(examples, items, user_codes, item_codes, tune=variant(cfg.tune, top), prompt=cfg.prompt,
                             llm=cfg.llm, seed=cfg.run.seed, model=model, tokenizer=tokenizer).stages
        name = f"top {top} cached" if top else "every layer"
        rows.append((name, stage.train_rows / stage.train_seconds, stage.best_auc, stage.train_seconds))
        print(f"{name}: {rows[-1][1]:.2f} prompts/s, validation AUC {stage.best_auc:.4f}", flush=True)
    print(f"\nLoRA tuning at {args.prompts} prompts (one epoch), validation on {args.valid_rows} rows, "
          f"BinMF validation AUC (warm rows) {binmf.best_auc:.4f}")
    for name, per_second, auc, seconds in rows:
        print(f"  {name:16s} {per_second:6.2f} prompts/s  {per_second / rows[0][1]:5.2f}x  valid AUC {auc:.4f}  "
              f"({seconds:.0f} s)")


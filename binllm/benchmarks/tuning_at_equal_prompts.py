"""Tuning variants at an equal number of prompts on the demo's data: prompts/s and validation AUC, one run.

    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 640 --valid-rows 1000
    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 1000 --epochs 3 --valid-rows 640 --top-dropout 0 \
        --set tune.stage2.distill=0.9 --set tune.stage2.distill_teacher=code_bits          # the demo's stage-2 target
    python -m jobs.benchmark_tuning_at_equal_prompts --prompts 16 --valid-rows 16 --top-layers 8 \
        --set encoder.max_epochs=1 --output-root /tmp/runs                                # a quick smoke run

The demo preset's data and encoder (ML-1M, the paper's months, BinMF codes), the real SmolLM2-135M, bf16
autocast where the CPU computes it natively (tune.autocast: auto; --autocast bfloat16 forces it); each variant
tunes fresh LoRA on the same --prompts full prompts for --epochs epochs (intuitive mode, the demo's stage-2 lr
and schedule) and is validated at the end of every epoch on the same --valid-rows rows. Variants:
- every layer: LoRA r=8 on q_proj/v_proj of all 30 layers (the demo before the frozen-trunk cache);
- top N cached: LoRA on every projection of the last N layers, the trunk below cached (tune.cache_trunk), with
  LoRA dropout --top-dropout (default: tune.lora.dropout);
- --variant top=N[,dropout=D][,lr=L][,r=R] (repeatable, instead of --top-layers): a top-N variant with its own
  dropout, stage lr (min_lr scaled by the same factor) and LoRA rank (alpha 2R, the configured alpha/r scaling).
prompts/s counts prompt passes (prompts x epochs) over the stage's wall time without validation; "x" is the
ratio to the first variant; each variant's best validation AUC is compared with the first's on the same rows
(paired bootstrap, 1,000 resamples: the difference and its 95% interval). The validation scores of every variant
are written to <output root>/bench-equal-prompts/valid_scores.parquet (a label column, a column per variant).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from binllm import sources
from binllm.config import TuneConfig, load_config
from binllm.encoder import export_codes, train_encoder
from binllm.metrics import paired_bootstrap_auc_diff
from binllm.run_steps import prepare_run
from binllm.tune import tune_lora

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--valid-rows", type=int, default=1000)
    parser.add_argument("--autocast", default="auto", choices=["", "auto", "bfloat16"])
    parser.add_argument("--top-layers", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--top-dropout", type=float, default=None,
                        help="LoRA dropout of the top-N variants (default: tune.lora.dropout, as every layer's)")
    parser.add_argument("--variant", dest="variants", action="append", default=[], type=parse_variant,
                        metavar="top=N[,dropout=D][,lr=L][,r=R]",
                        help="a top-N variant with its own settings; repeatable; replaces --top-layers")
    parser.add_argument("--output-root", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides after the benchmark's own, e.g. encoder.max_epochs=1 for a quick run")
    return parser.parse_args(argv)


VARIANT_KEYS = {"top": int, "dropout": float, "lr": float, "r": int}


def parse_variant(spec: str) -> dict:
    """--variant's "top=4,lr=0.004" as {"top": 4, "lr": 0.004}; argparse reports a bad spec with its key."""
    settings = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise argparse.ArgumentTypeError(f"{part!r}: expected key=value with a key in {sorted(VARIANT_KEYS)}")
        try:
            settings[key] = VARIANT_KEYS[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a {VARIANT_KEYS[key].__name__}") from None
    if settings.get("top", 0) <= 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: top=N (N >= 1 layers) is required")
    return settings


def variant(tune: TuneConfig, top: int, dropout: float | None = None, lr: float | None = None,
            r: int | None = None) -> tuple[str, TuneConfig]:
    """(name, tune settings) of a variant: top 0 is every layer; dropout None keeps tune.lora's; lr sets the stages'
    lr and scales their min_lr by the same factor; r sets the LoRA rank with alpha 2r."""
    if top == 0:
        lora = dataclasses.replace(tune.lora, top_layers=0, target_modules=["q_proj", "v_proj"])
        name = "every layer"
    else:
        lora = dataclasses.replace(tune.lora, top_layers=top, target_modules=ALL_PROJECTIONS)
        name = f"top {top} cached"
    if dropout is not None and dropout != tune.lora.dropout:
        lora, name = dataclasses.replace(lora, dropout=dropout), f"{name}, dropout {dropout:g}"
    if r is not None and r != tune.lora.r:
        lora, name = dataclasses.replace(lora, r=r, alpha=2 * r), f"{name}, r {r}"
    tune = dataclasses.replace(tune, lora=lora, cache_trunk=top > 0)
    if lr is not None:
        scaled = lambda stage: dataclasses.replace(stage, lr=lr, min_lr=stage.min_lr * lr / stage.lr)
        tune = dataclasses.replace(tune, stage1=scaled(tune.stage1), stage2=scaled(tune.stage2))
        name = f"{name}, lr {lr:g}"
    return name, tune


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config("ray_config.yaml", [
        "data.format=demo_ml1m", "data.split.kind=months", "data.warm_min_train=4", "encoder.vocabulary=all",
        "encoder.shared_mask=true", "prompt.code_format=binary", "tune.mode=intuitive", f"tune.autocast={args.autocast}",
        "run.name=bench-equal-prompts", f"run.output_root={args.output_root}",
        f"tune.stage2={{lr: 0.002, micro_batch_size: 16, max_train_rows: {args.prompts}, "
        f"max_valid_rows: {args.valid_rows}, epochs: {args.epochs}, eval_every: 0, warmup_ratio: 0.05, min_lr: 0.0002}}",
        *args.overrides])
    examples, items = prepare_run(cfg.data, cfg.layout())
    binmf = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)
    user_codes, item_codes = export_codes(binmf)
    runs = []
    specs = args.variants or [{"top": top, "dropout": args.top_dropout} for top in args.top_layers]
    for spec in [{"top": 0}, *specs]:
        name, tune = variant(cfg.tune, **spec)
        model, tokenizer = sources.load_base_model(cfg.llm, cfg.storage)
        tuned = tune_lora(examples, items, user_codes, item_codes, tune=tune, prompt=cfg.prompt, llm=cfg.llm,
                          seed=cfg.run.seed, model=model, tokenizer=tokenizer)
        runs.append((name, tuned))
        (stage,) = tuned.stages
        print(f"{name}: {passes_per_second(stage):.2f} prompts/s, "
              f"validation AUC {stage.best_auc:.4f}", flush=True)
    scores_path = Path(cfg.run_dir(), "valid_scores.parquet")
    pq.write_table(pa.table({"label": runs[0][1].valid_labels, **{n: t.valid_scores for n, t in runs}}), scores_path)
    print(f"\nLoRA tuning at {args.prompts} prompts x {args.epochs} epochs, validation on {args.valid_rows} rows, "
          f"BinMF validation AUC (warm rows) {binmf.best_auc:.4f}")
    print(report(runs))
    print(f"validation scores of every variant (same rows): {scores_path}")


def prompt_passes(stage) -> float:
    return stage.steps * stage.prompts_per_step


def passes_per_second(stage) -> float:
    return prompt_passes(stage) / stage.train_seconds


def report(runs) -> str:
    """A line per variant: prompt passes/s, its ratio to the first variant, best validation AUC and its paired
    difference from the first variant's on the same rows."""
    _, first = runs[0]
    per_second = [passes_per_second(tuned.stages[0]) for _, tuned in runs]
    lines = []
    for (name, tuned), rate in zip(runs, per_second):
        stage = tuned.stages[0]
        line = (f"  {name:24s} {rate:6.2f} prompts/s  {rate / per_second[0]:5.2f}x  valid AUC {stage.best_auc:.4f}  "
                f"({prompt_passes(stage):.0f} passes in {stage.train_seconds:.0f} s)")
        if tuned is not first:
            if not np.array_equal(tuned.valid_labels, first.valid_labels):
                raise ValueError(f"{name} was validated on other rows than {runs[0][0]}: no paired comparison")
            d = paired_bootstrap_auc_diff(first.valid_labels, tuned.valid_scores, first.valid_scores)
            line += f"  - {runs[0][0]} {d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        lines.append(line)
    return "\n".join(lines)

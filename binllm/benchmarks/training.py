"""Training throughput: LoRA tuning tokens/s and encoder pretraining samples/s, with peak memory.

    python -m jobs.benchmark_training --shape smollm2-135m --steps 4            # this process, CPU or GPU
    python -m jobs.benchmark_training --runner ray --set distributed.num_workers=2 --set distributed.zero_stage=3
    python -m jobs.benchmark_training --set tune.stage2.micro_batch_size=32 --set llm.dtype=bfloat16

Synthetic data and a random-weight LLM of the named shape (binllm.benchmarks.synthetic: no downloads); tuning
settings come from the config (tune.stage2.*: micro_batch_size, grad_accum; distributed.*; llm.dtype). Tuning
runs in this process (LocalBackend) or as a Ray Train job on DeepSpeed workers. Results:
docs/training_benchmark.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from binllm.benchmarks.shapes import SHAPES
from binllm.benchmarks.synthetic import random_llm_folder, write_synthetic_inputs
from binllm.benchmarks.throughput import Throughput, encoder_throughput, tune_locally, tune_throughput
from binllm.config import Config, load_config
from binllm.ray_env import init_ray
from binllm.run_steps import tune_on_deepspeed
from binllm.train.ray_jobs import build_trainer

STATS_FILE = "tune_benchmark_rank{rank}.json"


def tune_benchmark_worker(config: dict) -> None:
    """Ray Train worker: the tuning job's worker body (inputs, precision, the DeepSpeed backend, tune_lora); each
    rank writes its figures to stats_dir."""
    cfg: Config = config["cfg"]
    result, backend = tune_on_deepspeed(cfg.layout(), tune=cfg.tune, prompt=cfg.prompt, llm=cfg.llm,
                                        distributed=cfg.distributed, storage_cfg=cfg.storage, seed=cfg.run.seed)
    stats = dataclasses.asdict(tune_throughput(result, backend.device))
    Path(config["stats_dir"], STATS_FILE.format(rank=backend.rank)).write_text(json.dumps(stats))


def tune_on_ray(cfg: Config, stats_dir: str | Path) -> Throughput:
    """A Ray Train tuning run (single node: the ranks write their figures into stats_dir), summed over ranks."""
    cfg = cfg.with_absolute_paths()
    build_trainer(tune_benchmark_worker, {"cfg": cfg, "stats_dir": str(stats_dir)}, job="lora", run=cfg.run,
                  distributed=cfg.distributed, storage_cfg=cfg.storage).fit()
    ranks = [json.loads(Path(stats_dir, STATS_FILE.format(rank=r)).read_text())
             for r in range(cfg.distributed.num_workers)]
    return Throughput(items=sum(r["items"] for r in ranks), padded_tokens=sum(r["padded_tokens"] for r in ranks),
                      seconds=max(r["seconds"] for r in ranks), steps=ranks[0]["steps"],
                      peak_memory_gib=max(r["peak_memory_gib"] for r in ranks))


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--runner", default="local", choices=("local", "ray"),
                        help="local: LocalBackend in this process; ray: Ray Train + DeepSpeed workers")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of LoRA tuning")
    parser.add_argument("--history", type=int, default=10, help="history titles per prompt (prompt length)")
    parser.add_argument("--encoder-rows", type=int, default=200_000, help="examples for encoder pretraining (0: skip)")
    parser.add_argument("--encoder-epochs", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    args = parse_args(argv, description)
    with tempfile.TemporaryDirectory(prefix="binllm-bench-") as work:
        model_dir = Path(work, "model")
        # The model folder and --encoder-epochs win over --set; the config is built once, never mutated.
        cfg = load_config(args.config, [
            f"run.output_root={work}/runs", "run.name=bench", "tune.mode=intuitive", f"data.history_len={args.history}",
            f"tune.stage2.max_steps={args.steps}", "tune.stage2.max_valid_rows=16", "tune.stage2.warmup_ratio=0.0",
            *args.overrides, f"llm.model={model_dir}",
            *([f"encoder.max_epochs={args.encoder_epochs}"] if args.encoder_rows else [])])
        if args.encoder_rows:
            write_synthetic_inputs(cfg, n_users=max(1000, args.encoder_rows // 50),
                                   n_items=max(500, args.encoder_rows // 100), n_rows=args.encoder_rows)
            encoder = encoder_throughput(cfg)
            print(f"encoder pretraining, one process, batch {cfg.encoder.batch_size}: {encoder.per_second:,.0f} "
                  f"samples/s ({encoder.items} samples, {encoder.steps} steps in {encoder.seconds:.1f} s incl. "
                  f"validation), peak memory {encoder.peak_memory_gib:.2f} GiB")
        stage = cfg.tune.stage2
        rows_needed = 10 * args.steps * stage.micro_batch_size * stage.grad_accum * cfg.distributed.num_workers
        write_synthetic_inputs(cfg, n_users=500, n_items=400, n_rows=max(rows_needed, 2000))
        random_llm_folder(model_dir, args.shape)
        if args.runner == "ray":
            init_ray()
            tune = tune_on_ray(cfg, work)
            where = (f"Ray Train, {cfg.distributed.num_workers} worker(s), ZeRO-{cfg.distributed.zero_stage}, "
                     f"{'GPU' if cfg.distributed.use_gpu else 'CPU'}")
        else:
            tune = tune_locally(cfg, model_dir)
            where = "one process (LocalBackend)"
        print(f"LoRA tuning, {args.shape}, {where}, dtype {cfg.llm.dtype}, micro-batch {stage.micro_batch_size} "
              f"x accum {stage.grad_accum}: {tune.per_second:,.0f} tokens/s ({tune.items} tokens, "
              f"{tune.padded_tokens - tune.items} padding, {tune.steps} steps in {tune.seconds:.1f} s), "
              f"peak memory {tune.peak_memory_gib:.2f} GiB")

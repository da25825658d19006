"""Training throughput: LoRA tuning tokens/s and peak memory, encoder pretraining samples/s.

    python -m jobs.benchmark_training --shape smollm2-135m --steps 4            # this process, CPU or GPU
    python -m jobs.benchmark_training --runner ray --set distributed.num_workers=2 --set distributed.zero_stage=3
    python -m jobs.benchmark_training --set tune.stage2.micro_batch_size=32 --set llm.dtype=bfloat16

Synthetic data and a random-weight LLM of the named shape (no downloads); tuning settings come from the
config (tune.stage2.*: micro_batch_size, grad_accum; distributed.*; llm.dtype). Results: docs/training_benchmark.md.
"""
from __future__ import annotations

import argparse
import logging
import tempfile

from binllm.cli import init_ray, setup_logging
from binllm.config import load_config
from binllm.train import benchmark

log = logging.getLogger("jobs.benchmark_training")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(benchmark.MODEL_SHAPES))
    parser.add_argument("--runner", default="local", choices=("local", "ray"),
                        help="local: LocalBackend in this process; ray: Ray Train + DeepSpeed workers")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of LoRA tuning")
    parser.add_argument("--history", type=int, default=10, help="history titles per prompt (prompt length)")
    parser.add_argument("--encoder-rows", type=int, default=200_000, help="examples for encoder pretraining (0: skip)")
    parser.add_argument("--encoder-epochs", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="binllm-bench-") as work:
        cfg = load_config(args.config, [
            f"run.output_root={work}/runs", "run.name=bench", "tune.mode=intuitive", f"data.history_len={args.history}",
            f"tune.stage2.max_steps={args.steps}", "tune.stage2.max_valid_rows=16", "tune.stage2.warmup_ratio=0.0",
            *args.overrides])
        if args.encoder_rows:
            cfg.encoder.max_epochs = args.encoder_epochs
            benchmark.write_synthetic_inputs(cfg, n_users=max(1000, args.encoder_rows // 50),
                                             n_items=max(500, args.encoder_rows // 100), n_rows=args.encoder_rows)
            encoder = benchmark.encoder_throughput(cfg)
            print(f"encoder pretraining, one process, batch {cfg.encoder.batch_size}: {encoder.per_second:,.0f} "
                  f"samples/s ({encoder.items} samples, {encoder.steps} steps in {encoder.seconds:.1f} s incl. "
                  f"validation), peak memory {encoder.peak_memory_gib:.2f} GiB")
        stage = cfg.tune.stage2
        rows_needed = 10 * args.steps * stage.micro_batch_size * stage.grad_accum * cfg.distributed.num_workers
        benchmark.write_synthetic_inputs(cfg, n_users=500, n_items=400, n_rows=max(rows_needed, 2000))
        model_dir = benchmark.random_llm_folder(f"{work}/model", args.shape)
        cfg.llm.model = str(model_dir)
        if args.runner == "ray":
            init_ray()
            tune = benchmark.tune_on_ray(cfg, work)
            where = (f"Ray Train, {cfg.distributed.num_workers} worker(s), ZeRO-{cfg.distributed.zero_stage}, "
                     f"{'GPU' if cfg.distributed.use_gpu else 'CPU'}")
        else:
            tune = benchmark.tune_locally(cfg, model_dir)
            where = "one process (LocalBackend)"
        print(f"LoRA tuning, {args.shape}, {where}, dtype {cfg.llm.dtype}, micro-batch {stage.micro_batch_size} "
              f"x accum {stage.grad_accum}: {tune.per_second:,.0f} tokens/s ({tune.items} tokens, "
              f"{tune.padded_tokens - tune.items} padding, {tune.steps} steps in {tune.seconds:.1f} s), "
              f"peak memory {tune.peak_memory_gib:.2f} GiB")


if __name__ == "__main__":
    main()

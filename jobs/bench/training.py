"""Training throughput: LoRA tuning tokens/s and encoder pretraining samples/s, with peak memory
(jobs.benchmark_training; jobs.gpu_check's tuning section uses the helpers).

Inputs are synthetic (clustered users and items, random codes) and the LLM has random weights at a
named shape (jobs.bench.shapes), so a benchmark needs no download: the figures depend on shapes and prompt
lengths only. Tuning runs in this process (LocalBackend) or as a Ray Train job on DeepSpeed workers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from binllm import sources, storage
from binllm.codes import code_table
from binllm.config import Config, load_config
from binllm.llm import build_tiny_llm, load_causal_lm
from jobs.bench.shapes import SHAPES

STATS_FILE = "tune_benchmark_rank{rank}.json"
TITLE_WORDS = ("Space", "Romance", "Crime", "Cartoon", "Western", "Mystery", "Musical", "War")


@dataclass
class Throughput:
    items: int  # tokens (tuning) or training samples (encoder), all ranks
    seconds: float
    steps: int
    peak_memory_gib: float  # GPU: max allocated by torch; CPU: max resident set of the process
    padded_tokens: int = 0

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds else float("nan")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def random_llm_folder(folder: str | Path, shape: str, seed: int = 0) -> Path:
    """A Hugging Face folder with a random LlamaForCausalLM of `shape` and the tiny test tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; expected one of {sorted(SHAPES)}")
    folder = Path(folder)
    build_tiny_llm(folder, seed=seed)  # writes the tokenizer; its tiny model is replaced below
    ids = json.loads((folder / "config.json").read_text())
    config = LlamaConfig(**SHAPES[shape], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                         pad_token_id=ids["pad_token_id"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def synthetic_examples(n_users: int, n_items: int, n_rows: int, history_len: int, seed: int = 0
                       ) -> tuple[pa.Table, pa.Table]:
    """Examples (prepared-examples contract) where a user clicks items of its own cluster with p=0.8,
    others with p=0.2; 80/10/10 time split; item titles carry the cluster word."""
    rng = np.random.default_rng(seed)
    clusters = len(TITLE_WORDS)
    user_cluster, item_cluster = rng.integers(0, clusters, n_users), rng.integers(0, clusters, n_items)
    users, items = rng.integers(0, n_users, n_rows), rng.integers(0, n_items, n_rows)
    labels = rng.random(n_rows) < np.where(user_cluster[users] == item_cluster[items], 0.8, 0.2)
    item_ids = np.array([f"i{k}" for k in range(n_items)], dtype=object)
    history, clicked = [], {}
    for u, i, y in zip(users.tolist(), items.tolist(), labels.tolist()):
        seen = clicked.setdefault(u, [])
        history.append(seen[-history_len:])
        if y:
            seen.append(item_ids[i])
    n_train, n_valid = int(0.8 * n_rows), int(0.1 * n_rows)
    split = ["train"] * n_train + ["valid"] * n_valid + ["test"] * (n_rows - n_train - n_valid)
    examples = pa.table({
        "user_id": pa.array([f"u{u}" for u in users.tolist()], pa.string()),
        "item_id": pa.array(item_ids[items].tolist(), pa.string()),
        "label": pa.array(labels.astype(np.int8)),
        "timestamp": pa.array(np.arange(n_rows, dtype=np.int64) * 60 + 1_600_000_000),
        "split": pa.array(split, pa.string()),
        "history": pa.array(history, pa.list_(pa.string())),
        "warm": pa.array(np.ones(n_rows, dtype=bool)),
    })
    titles = [f"The {TITLE_WORDS[c]} Story of Number {k} ({1950 + k % 70})" for k, c in enumerate(item_cluster.tolist())]
    return examples, pa.table({"item_id": pa.array(item_ids.tolist(), pa.string()), "title": pa.array(titles)})


def random_codes(ids: list[str], seed: int) -> pa.Table:
    return code_table(ids, np.random.default_rng(seed).integers(0, 256, (len(ids), 4), dtype=np.uint8))


def write_synthetic_inputs(cfg: Config, n_users: int, n_items: int, n_rows: int) -> None:
    """Synthetic examples and random code tables where the run's jobs read them."""
    examples, items = synthetic_examples(n_users, n_items, n_rows, cfg.data.history_len, cfg.run.seed)
    sources.write_examples(cfg, examples, items)
    codes = sources.codes_uri(cfg)
    storage.write_table(random_codes([f"u{k}" for k in range(n_users)], 1), f"{codes}/users.parquet", cfg.storage)
    storage.write_table(random_codes([f"i{k}" for k in range(n_items)], 2), f"{codes}/items.parquet", cfg.storage)


def tune_throughput(result, device: torch.device) -> Throughput:
    """The last stage's training figures (validation excluded)."""
    stage = result.stages[-1]
    return Throughput(items=stage.train_tokens, padded_tokens=stage.padded_tokens, seconds=stage.train_seconds,
                      steps=stage.steps, peak_memory_gib=peak_memory_gib(device))


def tune_locally(cfg: Config, model_dir: str | Path) -> Throughput:
    """One process on cuda when available, else CPU; the last stage's training time, validation excluded."""
    from binllm.tune import tune_lora

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples, items = sources.read_examples(cfg)
    user_codes, item_codes = sources.read_code_tables(cfg)
    model, tokenizer = load_causal_lm(model_dir, dtype=cfg.llm.dtype, device=device)
    return tune_throughput(tune_lora(examples, items, user_codes, item_codes, cfg, model=model,
                                     tokenizer=tokenizer), device)


def tune_benchmark_worker(config: dict) -> None:
    """Ray Train worker: the tuning job's worker body; each rank writes its figures to stats_dir."""
    from binllm.recipes.tune_lora import train_on_worker

    result, backend = train_on_worker(config["cfg"])
    stats = dataclasses.asdict(tune_throughput(result, backend.device))
    Path(config["stats_dir"], STATS_FILE.format(rank=backend.rank)).write_text(json.dumps(stats))


def tune_on_ray(cfg: Config, stats_dir: str | Path) -> Throughput:
    """A Ray Train tuning run (single node: the ranks write their figures into stats_dir), summed over ranks."""
    from binllm.train.ray_jobs import build_trainer

    build_trainer(tune_benchmark_worker, cfg, "lora", stats_dir=str(stats_dir)).fit()
    ranks = [json.loads(Path(stats_dir, STATS_FILE.format(rank=r)).read_text())
             for r in range(cfg.distributed.num_workers)]
    return Throughput(items=sum(r["items"] for r in ranks), padded_tokens=sum(r["padded_tokens"] for r in ranks),
                      seconds=max(r["seconds"] for r in ranks), steps=ranks[0]["steps"],
                      peak_memory_gib=max(r["peak_memory_gib"] for r in ranks))


def encoder_throughput(cfg: Config) -> Throughput:
    """train_encoder for cfg.encoder.max_epochs (no early stop) in this process: samples/s incl. validation."""
    from binllm.encoder import train_encoder

    examples, _ = sources.read_examples(cfg)
    encoder_cfg = dataclasses.replace(cfg.encoder, patience=cfg.encoder.max_epochs + 1)
    started = time.perf_counter()
    result = train_encoder(examples, encoder_cfg, kind="binary", seed=cfg.run.seed)
    seconds = time.perf_counter() - started
    n_train = int(np.sum(np.asarray(examples.column("split").to_pylist()) == "train"))
    return Throughput(items=n_train * result.epochs, seconds=seconds, steps=result.steps,
                      peak_memory_gib=peak_memory_gib(torch.device("cpu")))


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
    from binllm.cli import setup_logging
    from binllm.ray_env import init_ray

    args = parse_args(argv, description)
    setup_logging()
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

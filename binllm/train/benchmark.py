"""Training throughput: LoRA tuning tokens/s and encoder pretraining samples/s, with peak memory.

Inputs are synthetic (clustered users and items, random codes) and the LLM has random weights at a
named shape, so a benchmark needs no download: the figures depend on shapes and prompt lengths only.
Tuning runs in this process (LocalBackend) or as a Ray Train job on DeepSpeed workers.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from binllm import sources, storage
from binllm.codes import code_table
from binllm.config import Config
from binllm.llm import build_tiny_llm, load_causal_lm

# LlamaConfig fields of HuggingFaceTB/SmolLM2-135M(-Instruct).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=600, max_position_embeddings=2048, tie_word_embeddings=False),
}
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

    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; expected one of {sorted(MODEL_SHAPES)}")
    folder = Path(folder)
    build_tiny_llm(folder, seed=seed)  # writes the tokenizer; its tiny model is replaced below
    ids = json.loads((folder / "config.json").read_text())
    config = LlamaConfig(**MODEL_SHAPES[shape], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
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
    """Ray Train worker: tune_lora on the DeepSpeed backend; each rank writes its figures to stats_dir."""
    from binllm.train.deepspeed_config import llm_precision
    from binllm.train.distributed import DeepSpeedBackend
    from binllm.tune import tune_lora

    cfg: Config = config["cfg"]
    precision = llm_precision(cfg.llm.dtype, cfg.distributed.use_gpu)
    backend = DeepSpeedBackend(cfg.distributed, precision=precision)
    examples, items = sources.read_examples(cfg)
    user_codes, item_codes = sources.read_code_tables(cfg)
    model, tokenizer = load_causal_lm(sources.model_folder(cfg.llm.model, cfg),
                                      dtype="bfloat16" if precision == "bf16" else "float32", device=backend.device)
    result = tune_lora(examples, items, user_codes, item_codes, cfg, model=model, tokenizer=tokenizer,
                       backend=backend)
    stats = dataclasses.asdict(tune_throughput(result, backend.device))
    Path(config["stats_dir"], STATS_FILE.format(rank=backend.rank)).write_text(json.dumps(stats))


def tune_on_ray(cfg: Config, stats_dir: str | Path) -> Throughput:
    """A Ray Train tuning run (single node: the ranks write their figures into stats_dir), summed over ranks."""
    from binllm.train.ray_jobs import build_trainer

    build_trainer(tune_benchmark_worker, cfg, stats_dir=str(stats_dir)).fit()
    ranks = [json.loads(Path(stats_dir, STATS_FILE.format(rank=r)).read_text())
             for r in range(cfg.distributed.num_workers)]
    return Throughput(items=sum(r["items"] for r in ranks), padded_tokens=sum(r["padded_tokens"] for r in ranks),
                      seconds=max(r["seconds"] for r in ranks), steps=ranks[0]["steps"],
                      peak_memory_gib=max(r["peak_memory_gib"] for r in ranks))


def encoder_throughput(cfg: Config) -> Throughput:
    """train_encoder for cfg.encoder.max_epochs (no early stop) in this process: samples/s incl. validation."""
    from binllm.encoder import train_encoder

    examples, _ = sources.read_examples(cfg)
    cfg.encoder.patience = cfg.encoder.max_epochs + 1
    started = time.perf_counter()
    result = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)
    seconds = time.perf_counter() - started
    n_train = int(np.sum(np.asarray(examples.column("split").to_pylist()) == "train"))
    return Throughput(items=n_train * result.epochs, seconds=seconds, steps=result.steps,
                      peak_memory_gib=peak_memory_gib(torch.device("cpu")))

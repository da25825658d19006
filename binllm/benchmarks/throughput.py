"""Training figures in this process: LoRA tuning tokens/s (the last stage, validation excluded) and encoder
pretraining samples/s, with peak memory; what binllm.benchmarks.training and the GPU check's tuning section
print."""
from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from binllm import sources
from binllm.config import Config
from binllm.encoder import train_encoder
from binllm.llm import load_causal_lm
from binllm.tune import TuneResult, tune_lora


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


def tune_throughput(result: TuneResult, device: torch.device) -> Throughput:
    """The last stage's training figures (validation excluded)."""
    stage = result.stages[-1]
    return Throughput(items=stage.train_tokens, padded_tokens=stage.padded_tokens, seconds=stage.train_seconds,
                      steps=stage.steps, peak_memory_gib=peak_memory_gib(device))


def tune_locally(cfg: Config, model_dir: str | Path) -> Throughput:
    """tune_lora in one process on cuda when available, else CPU, on the run's examples and codes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples, items = sources.read_examples(cfg.layout())
    user_codes, item_codes = sources.read_code_tables(cfg.layout())
    model, tokenizer = load_causal_lm(model_dir, dtype=cfg.llm.dtype, device=device)
    return tune_throughput(tune_lora(examples, items, user_codes, item_codes, tune=cfg.tune, prompt=cfg.prompt,
                                     llm=cfg.llm, seed=cfg.run.seed, model=model, tokenizer=tokenizer), device)


def encoder_throughput(cfg: Config) -> Throughput:
    """train_encoder for cfg.encoder.max_epochs (no early stop) in this process: samples/s incl. validation."""
    examples, _ = sources.read_examples(cfg.layout())
    encoder_cfg = dataclasses.replace(cfg.encoder, patience=cfg.encoder.max_epochs + 1)
    started = time.perf_counter()
    result = train_encoder(examples, encoder_cfg, kind="binary", seed=cfg.run.seed)
    seconds = time.perf_counter() - started
    n_train = int(np.sum(np.asarray(examples.column("split").to_pylist()) == "train"))
    return Throughput(items=n_train * result.epochs, seconds=seconds, steps=result.steps,
                      peak_memory_gib=peak_memory_gib(torch.device("cpu")))

"""Tune LoRA (two-step or intuitive) on Ray Train + DeepSpeed ZeRO; writes the PEFT adapter folder.

    binllm tune_lora --config ray_config.yaml --set distributed.num_workers=2
    ray job submit --working-dir . -- python -m jobs.tune_lora --config ray_config.yaml

Reads <run dir>/examples, <run dir>/codes (or data.examples / encoder.codes) and the base model
(llm.model: a local folder, an s3:// prefix or demo:smollm2-135m); writes the adapter to tune.adapter
(default <run dir>/adapter) with tune_result.json and binllm_prompt_spec.json (binllm.prompt_spec) beside
it. Its Ray Train run is `<run.name>-lora`:
the same run.name resumes it from its latest checkpoint; a new run.name starts fresh.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from binllm import prompt_spec, sources, storage
from binllm.config import Config
from binllm.llm import save_adapter
from binllm.tune import TuneResult, tune_lora

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "distributed")
TUNE_SUMMARY_FILE = "tune_result.json"


def read_inputs(cfg: Config):
    """(examples, items, user codes, item codes): codes only when a stage's prompts use them."""
    examples, items = sources.read_examples(cfg)
    needs_codes = cfg.tune.mode == "two_step" or cfg.prompt.kind != "text"
    user_codes, item_codes = sources.read_code_tables(cfg) if needs_codes else (None, None)
    return examples, items, user_codes, item_codes


def train_on_worker(cfg: Config):
    """The Ray Train worker body: read the inputs, pick the precision, load the LLM on this worker's
    device, tune_lora on the DeepSpeed backend. Returns (TuneResult, backend)."""
    from binllm.train.deepspeed_config import llm_precision
    from binllm.train.distributed import DeepSpeedBackend

    examples, items, user_codes, item_codes = read_inputs(cfg)
    precision = llm_precision(cfg.llm.dtype, cfg.distributed.use_gpu)
    backend = DeepSpeedBackend(cfg.distributed, precision=precision)
    model, tokenizer = sources.load_base_model(cfg, dtype="bfloat16" if precision == "bf16" else "float32",
                                               device=backend.device)
    result = tune_lora(examples, items, user_codes, item_codes, cfg, model=model, tokenizer=tokenizer,
                       backend=backend)
    return result, backend


def publish_adapter(result: TuneResult, uri: str, cfg: Config) -> None:
    """Writes the adapter folder (+ a tuning summary and the prompt spec it was tuned with, see
    binllm.prompt_spec) to `uri`, local or s3://; adapter_config.json goes last, so a reader never loads a
    partly written or partly replaced adapter."""
    summary = {"best_auc": result.best_auc, "answer": dataclasses.asdict(result.answer), "base_model": cfg.llm.model,
               "stages": [dataclasses.asdict(s) for s in result.stages]}
    with tempfile.TemporaryDirectory() as local:
        save_adapter(result.model, local, state=result.adapter_state)
        Path(local, TUNE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        Path(local, prompt_spec.SPEC_FILE).write_text(json.dumps(prompt_spec.spec_for(cfg), indent=2))
        storage.upload_dir(local, uri, cfg.storage, last=("adapter_config.json",))


def worker(config: dict) -> None:
    """Ray Train worker: tunes, and rank 0 publishes the adapter."""
    cfg: Config = config["cfg"]
    result, backend = train_on_worker(cfg)
    if backend.is_main:
        publish_adapter(result, sources.adapter_uri(cfg), cfg)
        log.info("tuning: best validation AUC %.4f; adapter at %s", result.best_auc, sources.adapter_uri(cfg))


def setup(cfg: Config):
    from binllm.train.ray_jobs import build_trainer

    return build_trainer(worker, cfg, "lora")


def run(cfg: Config, trainer):
    return trainer.fit()


def publish(cfg: Config, result):
    log.info("tuning run %s finished: last report %s; adapter at %s", cfg.run.name, result.metrics,
             sources.adapter_uri(cfg))
    return result


def main(cfg: Config):
    return publish(cfg, run(cfg, setup(cfg)))

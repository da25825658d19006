"""Tune LoRA (two-step or intuitive) on Ray Train + DeepSpeed ZeRO; writes the PEFT adapter folder.

    binllm tune_lora --config ray_config.yaml --set distributed.num_workers=2
    ray job submit --working-dir . -- python -m jobs.tune_lora --config ray_config.yaml

Reads <run dir>/examples, <run dir>/codes (or data.examples / encoder.codes) and the base model
(llm.model: a local folder, an s3:// prefix or demo:smollm2-135m); writes the adapter to tune.adapter
(default <run dir>/adapter) with tune_result.json and binllm_prompt_spec.json (binllm.prompt_spec) beside
it. Its Ray Train run is `<run.name>-lora`:
the same run.name resumes it from its latest checkpoint; a new run.name starts fresh.
Rank 0 records the run in MLflow (binllm.tracking, the run `<run.name>-tune_lora`): the config, each stage's
validation AUC and loss per step, the best AUCs, and the adapter registered (with its prompt spec and code
tables) as a new version of tracking.model_name, which jobs.score reads as tune.adapter=models:/<name>/<version>.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from binllm import prompt_spec, tracking
from binllm.config import Config, ConfigError
from binllm.run_steps import publish_adapter, record_tuning, tune_on_deepspeed
from binllm.train.ray_jobs import build_trainer

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "distributed", "tracking")


def worker(config: dict) -> None:
    """Ray Train worker: reads the inputs, picks the precision, loads the LLM on this worker's device, runs
    tune_lora on the DeepSpeed backend; rank 0 publishes the adapter with its prompt spec and records the run in
    MLflow (registering the adapter)."""
    cfg: Config = config["cfg"]
    started = time.time()
    layout = cfg.layout()
    result, backend = tune_on_deepspeed(layout, tune=cfg.tune, prompt=cfg.prompt, llm=cfg.llm,
                                        distributed=cfg.distributed, storage_cfg=cfg.storage, seed=cfg.run.seed)
    with tracking.job_run(cfg.tracking, cfg.run.output_root, run_name=cfg.run.name, job="tune_lora",
                          params=cfg.to_dict(), is_main=backend.is_main, started=started) as tracked:
        if backend.is_main:
            spec = prompt_spec.spec_for(cfg.prompt, cfg.llm, cfg.data.history_len, layout)
            publish_adapter(result, layout.adapter, spec, cfg.llm.model, cfg.storage)
            log.info("tuning: best validation AUC %.4f; adapter at %s", result.best_auc, layout.adapter)
        record_tuning(tracked, result, layout, cfg.tracking.model_name)


def main(cfg: Config):
    """Runs the Ray Train run `<run.name>-lora` and returns its Result."""
    if tracking.is_registered(cfg.tune.adapter):
        raise ConfigError(f"config key 'tune.adapter': {cfg.tune.adapter} is read by jobs.score; tuning writes a "
                          "folder (empty: <run dir>/adapter) and registers it as tracking.model_name")
    cfg = cfg.with_absolute_paths()
    cfg = dataclasses.replace(cfg, tracking=tracking.resolved(cfg.tracking, cfg.run.output_root))
    trainer = build_trainer(worker, {"cfg": cfg}, job="lora", run=cfg.run, distributed=cfg.distributed,
                            storage_cfg=cfg.storage)
    result = trainer.fit()
    log.info("tuning run %s finished: last report %s; adapter at %s", cfg.run.name, result.metrics,
             cfg.layout().adapter)
    return result

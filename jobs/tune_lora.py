"""Tune LoRA (two-step or intuitive) on Ray Train + DeepSpeed ZeRO; writes the PEFT adapter folder.

    python -m jobs.tune_lora --config ray_config.yaml --set distributed.num_workers=2
    ray job submit --working-dir . -- python -m jobs.tune_lora --config ray_config.yaml

Reads <run dir>/examples, <run dir>/codes (or data.examples / encoder.codes) and the base model
(llm.model: a local folder, an s3:// prefix or demo:smollm2-135m); writes the adapter to tune.adapter
(default <run dir>/adapter) with tune_result.json beside it. The same run.name resumes that run from
its latest checkpoint; a new run.name starts fresh.
"""
from __future__ import annotations

import logging

from binllm.cli import init_ray, run_job
from binllm.config import Config
from binllm.sources import adapter_uri
from binllm.train import ray_jobs

log = logging.getLogger("jobs.tune_lora")


def run(cfg: Config):
    init_ray()
    result = ray_jobs.tune(cfg)
    log.info("tuning run %s finished: last report %s; adapter at %s", cfg.run.name, result.metrics, adapter_uri(cfg))
    return result


if __name__ == "__main__":
    run_job(run, __doc__)

"""Pretrain the binary encoder (MF + hashing layer) on Ray Train + DeepSpeed; writes the code tables.

    python -m jobs.pretrain_encoder --config ray_config.yaml --set distributed.num_workers=2
    ray job submit --working-dir . -- python -m jobs.pretrain_encoder --config ray_config.yaml

Reads <run dir>/examples (or data.examples); writes <codes>/users.parquet and <codes>/items.parquet
(encoder.codes, default <run dir>/codes) and the encoder to <run dir>/encoder. The same run.name
resumes that run from its latest checkpoint; a new run.name starts fresh.
"""
from __future__ import annotations

import logging

from binllm.cli import init_ray, run_job
from binllm.config import Config
from binllm.sources import codes_uri
from binllm.train import ray_jobs

log = logging.getLogger("jobs.pretrain_encoder")


def run(cfg: Config):
    init_ray()
    result = ray_jobs.pretrain_encoder(cfg)
    log.info("encoder run %s finished: last report %s; codes at %s", cfg.run.name, result.metrics, codes_uri(cfg))
    return result


if __name__ == "__main__":
    run_job(run, __doc__)

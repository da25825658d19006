"""Pretrain the binary encoder (MF + hashing layer) on Ray Train + DeepSpeed; writes the code tables.

    binllm pretrain_encoder --config ray_config.yaml --set distributed.num_workers=2
    ray job submit --working-dir . -- python -m jobs.pretrain_encoder --config ray_config.yaml

Reads <run dir>/examples (or data.examples); writes <codes>/users.parquet and <codes>/items.parquet
(encoder.codes, default <run dir>/codes) and the encoder to <run dir>/encoder. Its Ray Train run is
`<run.name>-encoder`: the same run.name resumes it from its latest checkpoint; a new run.name starts fresh.
Rank 0 records the run in MLflow (binllm.tracking, the run `<run.name>-pretrain_encoder`): the config, the
validation AUC per step and the best AUC.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from binllm import sources, tracking
from binllm.config import Config
from binllm.encoder import train_encoder
from binllm.run_steps import publish_encoder, record_encoder
from binllm.train.distributed import DeepSpeedBackend
from binllm.train.ray_jobs import build_trainer

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "distributed", "tracking")
ENCODER_ZERO_STAGE_CAP = 2  # the encoder's validation forwards differ per rank; ZeRO-3 forwards are collective


def worker(config: dict) -> None:
    """Ray Train worker: train_encoder on the DeepSpeed backend; rank 0 publishes and records the run in MLflow."""
    cfg: Config = config["cfg"]
    started = time.time()
    layout = cfg.layout()
    examples, _ = sources.read_examples(layout)
    world_size = cfg.distributed.num_workers
    backend = DeepSpeedBackend(cfg.distributed, precision="fp32",  # codes are signs: computed in float32
                               micro_batch_size=-(-cfg.encoder.batch_size // world_size),
                               zero_stage=min(cfg.distributed.zero_stage, ENCODER_ZERO_STAGE_CAP))
    result = train_encoder(examples, cfg.encoder, kind="binary", backend=backend, seed=cfg.run.seed)
    with tracking.job_run(cfg.tracking, cfg.run.output_root, run_name=cfg.run.name, job="pretrain_encoder",
                          params=cfg.to_dict(), is_main=backend.is_main, started=started) as tracked:
        if backend.is_main:
            publish_encoder(layout, result)
            log.info("encoder: best validation AUC %.4f after %d steps; codes at %s", result.best_auc, result.steps,
                     layout.codes)
        record_encoder(tracked, result)


def main(cfg: Config):
    """Runs the Ray Train run `<run.name>-encoder` and returns its Result."""
    cfg = cfg.with_absolute_paths()
    cfg = dataclasses.replace(cfg, tracking=tracking.resolved(cfg.tracking, cfg.run.output_root))
    trainer = build_trainer(worker, {"cfg": cfg}, job="encoder", run=cfg.run, distributed=cfg.distributed,
                            storage_cfg=cfg.storage)
    result = trainer.fit()
    log.info("encoder run %s finished: last report %s; codes at %s", cfg.run.name, result.metrics, cfg.layout().codes)
    return result

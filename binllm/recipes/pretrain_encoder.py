"""Pretrain the binary encoder (MF + hashing layer) on Ray Train + DeepSpeed; writes the code tables.

    binllm pretrain_encoder --config ray_config.yaml --set distributed.num_workers=2
    ray job submit --working-dir . -- python -m jobs.pretrain_encoder --config ray_config.yaml

Reads <run dir>/examples (or data.examples); writes <codes>/users.parquet and <codes>/items.parquet
(encoder.codes, default <run dir>/codes) and the encoder to <run dir>/encoder. Its Ray Train run is
`<run.name>-encoder`: the same run.name resumes it from its latest checkpoint; a new run.name starts fresh.
"""
from __future__ import annotations

import logging

from binllm import sources, storage
from binllm.config import Config
from binllm.encoder import EncoderResult, export_codes, save_encoder, train_encoder, write_code_tables

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "distributed")
ENCODER_ZERO_STAGE_CAP = 2  # the encoder's validation forwards differ per rank; ZeRO-3 forwards are collective


def publish_encoder(cfg: Config, result: EncoderResult) -> None:
    """The code tables (<codes>/users.parquet, items.parquet) and the encoder itself (<run dir>/encoder)."""
    users, items = export_codes(result)
    fs, codes_path = storage.filesystem_for(sources.codes_uri(cfg), cfg.storage)
    write_code_tables(users, items, codes_path, filesystem=fs)
    fs, encoder_path = storage.filesystem_for(sources.encoder_uri(cfg), cfg.storage)
    save_encoder(result, encoder_path, filesystem=fs)


def worker(config: dict) -> None:
    """Ray Train worker: train_encoder on the DeepSpeed backend; rank 0 publishes."""
    from binllm.train.distributed import DeepSpeedBackend

    cfg: Config = config["cfg"]
    examples, _ = sources.read_examples(cfg)
    world_size = cfg.distributed.num_workers
    backend = DeepSpeedBackend(cfg.distributed, precision="fp32",  # codes are signs: computed in float32
                               micro_batch_size=-(-cfg.encoder.batch_size // world_size),
                               zero_stage=min(cfg.distributed.zero_stage, ENCODER_ZERO_STAGE_CAP))
    result = train_encoder(examples, cfg.encoder, kind="binary", backend=backend, seed=cfg.run.seed)
    if backend.is_main:
        publish_encoder(cfg, result)
        log.info("encoder: best validation AUC %.4f after %d steps; codes at %s", result.best_auc, result.steps,
                 sources.codes_uri(cfg))


def setup(cfg: Config):
    from binllm.train.ray_jobs import build_trainer

    return build_trainer(worker, cfg, "encoder")


def run(cfg: Config, trainer):
    return trainer.fit()


def publish(cfg: Config, result):
    log.info("encoder run %s finished: last report %s; codes at %s", cfg.run.name, result.metrics, sources.codes_uri(cfg))
    return result


def main(cfg: Config):
    return publish(cfg, run(cfg, setup(cfg)))

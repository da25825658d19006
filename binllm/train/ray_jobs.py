"""Encoder pretraining and LoRA tuning as Ray Train jobs (TorchTrainer + DeepSpeed workers).

The worker functions call the very same `train_encoder` / `tune_lora` as a local run, with a
`DeepSpeedBackend`; rank 0 writes the exports (code tables + encoder, or the adapter folder). The run's
Ray Train state lives under `<distributed.storage_path or <output_root>/ray_train>/<run.name>`: running a
job again with the same run name continues that run from its latest checkpoint (after a finished
run, it re-exports the finished result); a new run name starts fresh.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from binllm import sources, storage
from binllm.config import Config

log = logging.getLogger(__name__)

ENCODER_ZERO_STAGE_CAP = 2  # the encoder's validation forwards differ per rank; ZeRO-3 forwards are collective


def ray_storage(cfg: Config) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a local folder, or a bucket path + S3 filesystem."""
    uri = cfg.distributed.storage_path or storage.join_uri(cfg.run.output_root, "ray_train")
    filesystem, path = storage.filesystem_for(uri, cfg.storage)
    return (path, filesystem) if storage.is_s3(uri) else (path, None)


def build_trainer(worker: Callable[[dict], None], cfg: Config, **loop_config: Any):
    """A TorchTrainer running `worker({"cfg": cfg, **loop_config})` on cfg.distributed's workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = cfg.distributed
    resources = {"CPU": dist.cpus_per_worker}
    if dist.use_gpu:
        resources["GPU"] = dist.gpus_per_worker
    storage_path, storage_filesystem = ray_storage(cfg)
    return TorchTrainer(
        worker,
        train_loop_config={"cfg": cfg, **loop_config},
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=dist.num_to_keep,
                                                         checkpoint_score_attribute="auc",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
        ),
    )


def encoder_worker(config: dict) -> None:
    from binllm.encoder import train_encoder
    from binllm.train.distributed import DeepSpeedBackend

    cfg: Config = config["cfg"]
    examples, _ = sources.read_examples(cfg)
    world_size = cfg.distributed.num_workers
    backend = DeepSpeedBackend(cfg.distributed, precision="fp32",  # codes are signs: computed in float32
                               micro_batch_size=-(-cfg.encoder.batch_size // world_size),
                               zero_stage=min(cfg.distributed.zero_stage, ENCODER_ZERO_STAGE_CAP))
    result = train_encoder(examples, cfg.encoder, kind="binary", backend=backend, seed=cfg.run.seed)
    if backend.is_main:
        sources.write_encoder_outputs(cfg, result)
        log.info("encoder: best validation AUC %.4f after %d steps; codes at %s", result.best_auc, result.steps,
                 sources.codes_uri(cfg))


def tune_worker(config: dict) -> None:
    from binllm.llm import load_causal_lm
    from binllm.train.deepspeed_config import llm_precision
    from binllm.train.distributed import DeepSpeedBackend
    from binllm.tune import publish_adapter, tune_lora

    cfg: Config = config["cfg"]
    examples, items = sources.read_examples(cfg)
    needs_codes = cfg.tune.mode == "two_step" or cfg.prompt.kind != "text"
    user_codes, item_codes = sources.read_code_tables(cfg) if needs_codes else (None, None)
    precision = llm_precision(cfg.llm.dtype, cfg.distributed.use_gpu)
    backend = DeepSpeedBackend(cfg.distributed, precision=precision)
    folder = sources.model_folder(cfg.llm.model, cfg)
    model, tokenizer = load_causal_lm(folder, dtype="bfloat16" if precision == "bf16" else "float32",
                                      device=backend.device)
    result = tune_lora(examples, items, user_codes, item_codes, cfg, model=model, tokenizer=tokenizer,
                       backend=backend)
    if backend.is_main:
        publish_adapter(result, sources.adapter_uri(cfg), cfg)
        log.info("tuning: best validation AUC %.4f; adapter at %s", result.best_auc, sources.adapter_uri(cfg))


def pretrain_encoder(cfg: Config):
    """Runs encoder pretraining on the Ray cluster; returns Ray Train's Result."""
    return build_trainer(encoder_worker, cfg).fit()


def tune(cfg: Config):
    """Runs LoRA tuning on the Ray cluster; returns Ray Train's Result."""
    return build_trainer(tune_worker, cfg).fit()

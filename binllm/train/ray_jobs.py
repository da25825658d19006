"""Ray Train jobs: a TorchTrainer over cfg.distributed's workers, checkpointing to local or S3 storage.

Recipes pass the worker function (binllm.recipes.pretrain_encoder / tune_lora), which runs the same
training code as a local run with a `DeepSpeedBackend`. Each job is its own Ray Train run, named
`<run.name>-<job>` (`ray_train_name`), so the encoder's and the LoRA tuning's checkpoints never mix and
each job's checkpoint retention ranks only its own. Its state lives under
`<distributed.storage_path or <output_root>/ray_train>/<run.name>-<job>`: running a job again with the
same run name continues that job's run from its latest checkpoint (after a finished run, it re-exports
the finished result); a new run name starts fresh.
"""
from __future__ import annotations

from typing import Any, Callable

from binllm import storage
from binllm.config import Config
from binllm.ray_env import init_ray


def ray_storage(cfg: Config) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a local folder, or a bucket path + S3 filesystem."""
    uri = cfg.distributed.storage_path or storage.join_uri(cfg.run.output_root, "ray_train")
    filesystem, path = storage.filesystem_for(uri, cfg.storage)
    return (path, filesystem) if storage.is_s3(uri) else (path, None)


JOBS = ("encoder", "lora")  # the training jobs, each one Ray Train run per run.name


def ray_train_name(cfg: Config, job: str) -> str:
    """The Ray Train run of `job` in this run: `<run.name>-<job>`, one folder under the Ray Train storage
    (a name with '/' would nest folders, which Ray Train's Result.from_path does not read back)."""
    if job not in JOBS:
        raise ValueError(f"unknown training job {job!r}; expected one of {list(JOBS)}")
    return f"{cfg.run.name}-{job}"


def build_trainer(worker: Callable[[dict], None], cfg: Config, job: str, **loop_config: Any):
    """A TorchTrainer running `worker({"cfg": cfg, **loop_config})` on cfg.distributed's workers, on the
    Ray cluster of RAY_ADDRESS or a local Ray started here, as the Ray Train run `ray_train_name(cfg, job)`."""
    init_ray()
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
            name=ray_train_name(cfg, job), storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=dist.num_to_keep,
                                                         checkpoint_score_attribute="auc",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
        ),
    )

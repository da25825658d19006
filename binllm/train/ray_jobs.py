"""Ray Train jobs: a TorchTrainer over cfg.distributed's workers, checkpointing to local or S3 storage.

Recipes pass the worker function (binllm.recipes.pretrain_encoder / tune_lora), which runs the same
training code as a local run with a `DeepSpeedBackend`. Each job is its own Ray Train run, named
`<run.name>-<job>` (`ray_train_name`), so the encoder's and the LoRA tuning's checkpoints never mix and
each job's checkpoint retention ranks only its own. Its state lives under
`<distributed.storage_path or <output_root>/ray_train>/<run.name>-<job>`: running a job again with the
same run name continues that job's run from its latest checkpoint (after a finished run, it re-exports
the finished result); a new run name starts fresh.

A worker failure (a killed process, an OOM, a planted failure) restarts the worker group from the latest
checkpoint, up to distributed.max_failures times. The user's errors (DataError, ConfigError: bad data or
configuration) fail the same way on every attempt: they are never retried, and fit() raises the worker's
error itself, so the job ends with the same one line and exit code 2 as an error on the driver.
"""
from __future__ import annotations

from typing import Any, Callable

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy

from binllm import storage
from binllm.config import ConfigError, DistributedConfig, RunConfig, StorageConfig
from binllm.data.schema import DataError
from binllm.ray_env import init_ray

# Errors that are the user's: the same input fails the same way on every attempt, so Ray Train does not retry
# them, and the driver raises them as they are (one line, exit 2 at the job's entry point). Any other worker
# failure (a killed process, a planted failure, an OOM) is still retried up to distributed.max_failures.
USER_ERRORS = (DataError, ConfigError)


def user_error(error: BaseException) -> BaseException | None:
    """The user's error (USER_ERRORS) behind a Ray Train failure, lowest rank first; None for any other."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], USER_ERRORS):
            return failures[rank]
    return None


def ray_storage(run: RunConfig, distributed: DistributedConfig, storage_cfg: StorageConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: distributed.storage_path (default
    <output_root>/ray_train) as a local folder, or a bucket path + S3 filesystem."""
    uri = distributed.storage_path or storage.join_uri(run.output_root, "ray_train")
    filesystem, path = storage.filesystem_for(uri, storage_cfg)
    return (path, filesystem) if storage.is_s3(uri) else (path, None)


JOBS = ("encoder", "lora")  # the training jobs, each one Ray Train run per run.name


def ray_train_name(run_name: str, job: str) -> str:
    """The Ray Train run of `job` in this run: `<run.name>-<job>`, one folder under the Ray Train storage
    (a name with '/' would nest folders, which Ray Train's Result.from_path does not read back)."""
    if job not in JOBS:
        raise ValueError(f"unknown training job {job!r}; expected one of {list(JOBS)}")
    return f"{run_name}-{job}"


class UserErrorsNotRetried(DefaultFailurePolicy):
    """Ray Train's default failure policy, except that the user's errors (USER_ERRORS) are not retried."""

    def _is_retryable_error(self, training_failed_error) -> bool:
        if user_error(training_failed_error) is not None:
            return False
        return super()._is_retryable_error(training_failed_error)


class Trainer(TorchTrainer):
    """A TorchTrainer that runs with UserErrorsNotRetried and whose fit() raises the user's error itself (not
    Ray Train's WorkerGroupError around it)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if "failure_policy" in controller_init_kwargs:
            controller_init_kwargs["failure_policy"] = UserErrorsNotRetried(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def fit(self):
        try:
            return super().fit()
        except Exception as exc:
            mine = user_error(exc)
            if mine is None:
                raise
            raise mine from None


def build_trainer(worker: Callable[[dict], None], loop_config: dict[str, Any], *, job: str, run: RunConfig,
                  distributed: DistributedConfig, storage_cfg: StorageConfig) -> Trainer:
    """A Trainer running `worker(loop_config)` on distributed's workers, on the Ray cluster of RAY_ADDRESS or a
    local Ray started here, as the Ray Train run `ray_train_name(run.name, job)` under `ray_storage`. Workers run
    in their own working directory: paths in loop_config and run.output_root must be absolute
    (Config.with_absolute_paths). A DataError or ConfigError in a worker is not retried; fit() raises it as it is."""
    init_ray()
    dist = distributed
    resources = {"CPU": dist.cpus_per_worker}
    if dist.use_gpu:
        resources["GPU"] = dist.gpus_per_worker
    storage_path, storage_filesystem = ray_storage(run, distributed, storage_cfg)
    return Trainer(
        worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=ray_train_name(run.name, job), storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=dist.num_to_keep,
                                                         checkpoint_score_attribute="auc",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
        ),
    )

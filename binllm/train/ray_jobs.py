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

import dataclasses
import functools
import os
from typing import Any, Callable

from binllm import storage
from binllm.config import Config, ConfigError
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


@functools.cache
def _classes():
    """(failure policy, trainer): Ray Train's default policy except that the user's errors are not retried, and
    a TorchTrainer that runs with it and whose fit() raises such an error itself (not Ray Train's
    WorkerGroupError around it). Built on first use, so that importing this module does not import Ray Train."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy

    class UserErrorsNotRetried(DefaultFailurePolicy):
        def _is_retryable_error(self, training_failed_error) -> bool:
            if user_error(training_failed_error) is not None:
                return False
            return super()._is_retryable_error(training_failed_error)

    class Trainer(TorchTrainer):
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

    return UserErrorsNotRetried, Trainer


def failure_policy(failure_config):
    """The failure policy every binllm Ray Train run uses (see _classes)."""
    return _classes()[0](failure_config)


def _absolute(location: str) -> str:
    """A relative local path made absolute against the driver's working directory; URIs and the demo model
    unchanged."""
    if not location or "://" in location or location.startswith("demo:") or os.path.isabs(location):
        return location
    return os.path.abspath(location)


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with its relative local paths made absolute: Ray Train workers run in their own working directory
    (the trial folder), where `runs/<name>/examples` would not be found."""
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, output_root=_absolute(cfg.run.output_root)),
        data=dataclasses.replace(cfg.data, path=_absolute(cfg.data.path), interactions=_absolute(cfg.data.interactions),
                                 items=_absolute(cfg.data.items), examples=_absolute(cfg.data.examples)),
        encoder=dataclasses.replace(cfg.encoder, codes=_absolute(cfg.encoder.codes)),
        llm=dataclasses.replace(cfg.llm, model=_absolute(cfg.llm.model)),
        tune=dataclasses.replace(cfg.tune, adapter=_absolute(cfg.tune.adapter)),
        distributed=dataclasses.replace(cfg.distributed, storage_path=_absolute(cfg.distributed.storage_path)),
    )


def build_trainer(worker: Callable[[dict], None], cfg: Config, job: str, **loop_config: Any):
    """A TorchTrainer running `worker({"cfg": cfg, **loop_config})` on cfg.distributed's workers, on the
    Ray cluster of RAY_ADDRESS or a local Ray started here, as the Ray Train run `ray_train_name(cfg, job)`.
    A DataError or ConfigError in a worker is not retried; fit() raises it as it is."""
    init_ray()
    import ray.train
    from ray.train.torch import TorchConfig

    cfg = with_absolute_paths(cfg)

    _, TorchTrainer = _classes()

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

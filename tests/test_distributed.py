"""Ray Train + DeepSpeed workers (2 CPU workers, gloo): ZeRO-3 LoRA tuning on S3 storage with a planted
failure, resume and a re-run of the same run name, and 2-worker encoder pretraining against the
single-process result; the user's errors in a worker are not retried and end as one line."""
import json
import logging
import os
import types
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from binllm import sources, storage
from binllm.codes import code_table
from binllm.cli import run_recipe
from binllm.config import ConfigError, DistributedConfig, load_config
from binllm.data.schema import DataError
from binllm.encoder import read_code_tables, train_encoder
from binllm.recipes import pretrain_encoder, tune_lora
from binllm.train.deepspeed_config import deepspeed_config, llm_precision
from binllm.train.distributed import DEFAULT_STAGE, STATE_FILE
from binllm.train.ray_jobs import UserErrorsNotRetried, build_trainer, user_error
from binllm.run_steps import TUNE_SUMMARY_FILE
from synthetic import make_planted_examples

TINY_TUNE = [
    "distributed.num_workers=2", "distributed.num_to_keep=10", "tune.lora.dropout=0.0",
    "tune.stage1.max_steps=2", "tune.stage1.eval_every=1", "tune.stage2.max_steps=4", "tune.stage2.eval_every=2",
    "tune.stage1.max_valid_rows=24", "tune.stage2.max_valid_rows=24", "tune.stage2.patience=5",
]


@pytest.fixture(scope="module", autouse=True)
def ray_local(tmp_path_factory):
    cache = tmp_path_factory.mktemp("binllm_cache")
    worker_tmp = tmp_path_factory.mktemp("worker_tmp")  # the workers' TMPDIR: what they leave there is visible
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"BINLLM_CACHE": str(cache), "GLOO_SOCKET_IFNAME": "lo",
                                       "TMPDIR": str(worker_tmp),
                                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}})
    yield worker_tmp
    ray.shutdown()


def write_run_inputs(cfg, llm_dir=None, n_rows=600):
    examples, items = make_planted_examples(40, 30, n_rows, seed=0, history_len=3)
    sources.write_examples(cfg.layout(), examples, items)
    rng = np.random.default_rng(0)
    codes = cfg.layout().codes
    storage.write_table(code_table([f"u{k}" for k in range(40)], rng.integers(0, 256, (40, 4), dtype=np.uint8)),
                        f"{codes}/users.parquet", cfg.storage)
    storage.write_table(code_table([f"i{k}" for k in range(30)], rng.integers(0, 256, (30, 4), dtype=np.uint8)),
                        f"{codes}/items.parquet", cfg.storage)
    if llm_dir is not None:
        storage.upload_dir(llm_dir, cfg.llm.model, cfg.storage)
    return examples


def s3_settings(endpoint):
    # Credentials come from the AWS variables (s3_bucket sets them here, ray_local in the workers).
    return [f"storage.endpoint_url={endpoint}", "storage.region=us-east-1"]


def test_zero3_tuning_on_s3_resumes_after_a_planted_failure(s3_bucket, s3_server, tiny_llm_dir, tmp_path, ray_local):
    cfg = load_config(None, [
        *TINY_TUNE, *s3_settings(s3_server), f"run.output_root={s3_bucket}/runs", "run.name=zero3",
        f"llm.model={s3_bucket}/models/tiny", "distributed.zero_stage=3", "distributed.fail_at_step=3",
    ])
    write_run_inputs(cfg, tiny_llm_dir)

    result = tune_lora.main(cfg)

    adapter = cfg.layout().adapter
    local_adapter = storage.download_dir(adapter, tmp_path / "adapter", cfg.storage)
    summary = json.loads((local_adapter / TUNE_SUMMARY_FILE).read_text())
    stage1, stage2 = summary["stages"]
    # Rank 0 failed at stage 2's third step; the restarted workers skipped the finished stage 1 and
    # resumed stage 2 from its step-2 checkpoint.
    assert (stage1["name"], stage1["steps"], stage1["resumed_from_step"]) == ("stage1", 2, None)
    assert (stage2["name"], stage2["steps"], stage2["resumed_from_step"]) == ("stage2", 4, 2)
    assert [h["step"] for h in stage2["history"]] == [2, 4]

    weights = load_file(local_adapter / "adapter_model.safetensors")
    assert weights and all(w.numel() > 0 for w in weights.values())
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)

    # The exported adapter equals the consolidated ZeRO-3 weights of the best stage-2 checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    validations = [(m["auc"], m["step"], c) for c, m in result.best_checkpoints
                   if m.get("stage") == "stage2" and "loss" in m]
    best_auc = max(auc for auc, _, _ in validations)
    best = min((step, c) for auc, step, c in validations if auc == best_auc)[1]
    with best.as_directory() as folder:
        consolidated = get_fp32_state_dict_from_zero_checkpoint(f"{folder}/deepspeed", tag="state",
                                                                exclude_frozen_parameters=True)
    consolidated = {k.replace(".default", ""): v for k, v in consolidated.items() if "lora_" in k}
    assert consolidated.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, consolidated[name].float(), rtol=0, atol=0)

    # The same run name again continues the finished run: both stages are skipped, the adapter re-exported.
    storage.delete_dir(adapter, cfg.storage)
    tune_lora.main(cfg)
    again = storage.download_dir(adapter, tmp_path / "again", cfg.storage)
    assert json.loads((again / TUNE_SUMMARY_FILE).read_text())["stages"] == summary["stages"]
    for name, value in load_file(again / "adapter_model.safetensors").items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    # Restored checkpoints are unpacked into the workers' temp folder and removed once loaded (or not needed).
    assert sorted(p.name for p in ray_local.glob("binllm-*")) == []


def test_two_worker_encoder_matches_single_process(tmp_path):
    cfg = load_config(None, [
        f"run.output_root={tmp_path}/runs", "run.name=encoder", "distributed.num_workers=2",
        "encoder.max_epochs=12", "encoder.batch_size=256", "encoder.anneal_epochs=2",
    ])
    examples = write_run_inputs(cfg, n_rows=3000)
    single = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)

    pretrain_encoder.main(cfg)

    users, items = read_code_tables(cfg.layout().codes)
    assert users.num_rows == len(single.user_ids) and items.num_rows == len(single.item_ids)
    from binllm.encoder import load_encoder

    distributed = load_encoder(storage.join_uri(cfg.run_dir(), "encoder"))
    # Seeds alone move this AUC by about +-0.01; DeepSpeed with one rank takes exactly the local steps.
    assert distributed.best_auc == pytest.approx(single.best_auc, abs=0.03), (distributed.best_auc, single.best_auc)
    assert distributed.best_auc > 0.75


def test_encoder_and_lora_jobs_of_one_run_name_keep_separate_ray_train_runs(tmp_path, tiny_llm_dir):
    cfg = load_config(None, [
        *TINY_TUNE, "distributed.num_workers=1", f"run.output_root={tmp_path}/runs", "run.name=shared",
        f"llm.model={tiny_llm_dir}", "encoder.max_epochs=3", "encoder.anneal_epochs=1", "encoder.batch_size=256",
    ])
    write_run_inputs(cfg)

    encoder_result = pretrain_encoder.main(cfg)
    lora_result = tune_lora.main(cfg)

    runs = tmp_path / "runs" / "ray_train"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["shared-encoder", "shared-lora"]
    assert (Path(encoder_result.path).name, Path(lora_result.path).name) == ("shared-encoder", "shared-lora")

    def stages(run):
        folders = sorted(f for f in (runs / run).glob("checkpoint_*") if f.is_dir())
        assert folders, f"no checkpoints in {run}"
        return {torch.load(f / STATE_FILE, weights_only=False)["stage"] for f in folders}

    assert stages("shared-encoder") == {DEFAULT_STAGE}
    assert stages("shared-lora") == {"stage1", "stage2"}
    # The tuning job started fresh: nothing of the encoder's run was resumed.
    summary = json.loads(Path(cfg.layout().adapter, TUNE_SUMMARY_FILE).read_text())
    assert [s["resumed_from_step"] for s in summary["stages"]] == [None, None]


def test_deepspeed_config_follows_the_distributed_section():
    zero3 = deepspeed_config(DistributedConfig(zero_stage=3, offload_optimizer=True, offload_params=True),
                             micro_batch_size=4, grad_accum=2, world_size=2, precision="bf16")
    assert zero3["train_batch_size"] == 16 and zero3["bf16"] == {"enabled": True}
    assert zero3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "optimizer" not in zero3  # the torch optimizer is passed in: nothing is JIT-compiled
    zero2 = deepspeed_config(DistributedConfig(), micro_batch_size=8, grad_accum=1, world_size=1, precision="fp32")
    assert zero2["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "overlap_comm": False}
    assert zero2["bf16"] == {"enabled": False} and zero2["gradient_clipping"] == 0.0
    with pytest.raises(ConfigError, match="offload_params"):
        deepspeed_config(DistributedConfig(zero_stage=2, offload_params=True), micro_batch_size=1, grad_accum=1,
                         world_size=1, precision="fp32")
    assert llm_precision("auto", use_gpu=True) == "bf16" and llm_precision("auto", use_gpu=False) == "fp32"


@pytest.mark.reliability(kind="bad input", what="a DataError raised in a Ray Train worker (retries allowed)",
                         outcome="not retried; exit 2, one line, as on the driver")
def test_user_errors_in_workers_are_not_retried_and_end_as_one_line(tmp_path, capsys, monkeypatch):
    """A worker failure is still retried: test_zero3_tuning_on_s3_resumes_after_a_planted_failure (and the
    policy's decisions in the next test)."""
    root_logger = logging.getLogger()
    # run_recipe's setup_logging replaces the root handlers (pytest's included): restored afterwards.
    monkeypatch.setattr(root_logger, "handlers", list(root_logger.handlers))
    monkeypatch.setattr(root_logger, "level", root_logger.level)
    attempts = tmp_path / "attempts"

    def worker(config):  # defined here: Ray pickles it by value
        from binllm.data.schema import DataError as WorkerDataError

        with open(config["attempts"], "a") as log:
            log.write("attempt\n")
        raise WorkerDataError("examples: split 'valid' needs rows of both labels")

    job = types.ModuleType("job", "A training job whose worker meets bad data.")
    job.main = lambda cfg: build_trainer(worker, {"attempts": str(attempts)}, job="encoder", run=cfg.run,
                                         distributed=cfg.distributed, storage_cfg=cfg.storage).fit()
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(job, ["--set", "run.name=user-error", "--set", f"run.output_root={tmp_path}/runs",
                         "--set", "distributed.max_failures=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: examples: split 'valid' needs rows of both labels"] and "Traceback" not in err
    assert attempts.read_text().split() == ["attempt"]  # not retried, though 3 failures were allowed


def test_the_failure_policy_retries_worker_failures_and_raises_user_errors():
    from ray.train import FailureConfig, WorkerGroupError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    policy = UserErrorsNotRetried(FailureConfig(max_failures=2))
    crash = WorkerGroupError("rank 0 died", {0: RuntimeError("killed")})
    assert policy.make_decision(crash) == FailureDecision.RETRY
    bad_data = DataError("examples: split 'valid' needs rows of both labels")
    mixed = WorkerGroupError("ranks 0 and 1", {1: bad_data, 0: RuntimeError("collective aborted")})
    assert policy.make_decision(mixed) == FailureDecision.RAISE
    assert user_error(mixed) is bad_data and user_error(crash) is None
    bad_config = ConfigError("config key 'x': bad")
    assert user_error(WorkerGroupError("", {0: bad_config, 1: bad_data})) is bad_config  # lowest rank first
    assert policy.make_decision(crash) == FailureDecision.RETRY  # the second of two allowed
    assert policy.make_decision(crash) == FailureDecision.RAISE


def test_relative_local_paths_reach_the_workers_as_absolute_paths(tmp_path, monkeypatch):
    """Ray Train workers run in the trial folder: `runs/<name>/examples` must be resolved on the driver."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [
        "run.output_root=runs", "data.examples=prep/examples", "encoder.codes=s3://bucket/codes",
        "llm.model=demo:smollm2-135m", "tune.adapter=file:///srv/adapter", "distributed.storage_path=ray"])
    cfg = cfg.with_absolute_paths()
    assert cfg.run.output_root == str(tmp_path / "runs") and cfg.data.examples == str(tmp_path / "prep/examples")
    assert cfg.distributed.storage_path == str(tmp_path / "ray")
    assert (cfg.encoder.codes, cfg.llm.model, cfg.tune.adapter) == ("s3://bucket/codes", "demo:smollm2-135m",
                                                                    "file:///srv/adapter")
    assert cfg.data.interactions == "" and cfg.data.path == ""  # unset stays unset

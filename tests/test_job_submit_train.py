"""`ray job submit` of the LoRA tuning job: a one-node Ray cluster on 127.0.0.1 (`ray start --head`), the job
submitted through the Job SDK with the code as its working dir, 2 DeepSpeed ZeRO-2 workers, outputs checked.

The cluster is stopped by signalling the process group of its own `ray start --block` process, which holds
exactly the processes it started (`ray stop` would stop every Ray instance of this user on the machine).
"""
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from mlflow import MlflowClient
from peft import PeftModel

from binllm import sources, storage, tracking
from binllm.codes import code_table
from binllm.config import load_config
from binllm.llm import load_causal_lm
from binllm.run_steps import TUNE_SUMMARY_FILE
from ray_cluster import submit_job
from synthetic import make_planted_examples

REPO = Path(__file__).resolve().parents[1]


def working_dir(tmp_path: Path, config: dict) -> Path:
    """What `ray job submit --working-dir .` ships: the packages and the job's config file."""
    folder = tmp_path / "job"
    for package in ("binllm", "jobs"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "ray_config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_ray_job_submit_runs_the_tuning_job(ray_head, tmp_path, tiny_llm_dir):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = {
        "run": {"output_root": str(tmp_path / "runs"), "name": "submitted"},
        "llm": {"model": str(tiny_llm_dir)},
        "distributed": {"num_workers": 2, "zero_stage": 2},
        "tune": {"mode": "two_step",
                 "stage1": {"max_steps": 2, "eval_every": 2, "max_valid_rows": 24},
                 "stage2": {"max_steps": 2, "eval_every": 2, "max_valid_rows": 24}},
    }
    cfg = load_config(None, [])
    cfg.run.output_root, cfg.run.name = config["run"]["output_root"], config["run"]["name"]
    examples, items = make_planted_examples(40, 30, 600, seed=0, history_len=3)
    sources.write_examples(cfg.layout(), examples, items)
    rng = np.random.default_rng(0)
    codes = cfg.layout().codes
    storage.write_table(code_table([f"u{k}" for k in range(40)], rng.integers(0, 256, (40, 4), dtype=np.uint8)),
                        f"{codes}/users.parquet")
    storage.write_table(code_table([f"i{k}" for k in range(30)], rng.integers(0, 256, (30, 4), dtype=np.uint8)),
                        f"{codes}/items.parquet")

    client = JobSubmissionClient(ray_head)
    job = submit_job(client, entrypoint=f"{sys.executable} -m jobs.tune_lora --config ray_config.yaml",
                 runtime_env={"working_dir": str(working_dir(tmp_path, config))})
    deadline = time.monotonic() + 400
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after 400 s:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-5000:]

    adapter = Path(cfg.layout().adapter)
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / TUNE_SUMMARY_FILE).is_file()
    base, _ = load_causal_lm(tiny_llm_dir)
    tuned = PeftModel.from_pretrained(base, adapter)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in tuned.named_parameters())

    # The submitted run is in MLflow (the embedded store under run.output_root): config, curves, the adapter
    # registered as version 1 of tracking.model_name
    store = tracking.store_uri(cfg.tracking, cfg.run.output_root)
    assert store == f"sqlite:///{tmp_path}/runs/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("binllm").experiment_id])
    assert (run.info.run_name, run.info.status) == ("submitted-tune_lora", "FINISHED")
    assert run.data.params["distributed.num_workers"] == "2" and "stage2/valid_auc" in run.data.metrics
    version = client.get_model_version("binllm-adapter", "1")
    assert version.run_id == run.info.run_id and version.tags["binllm.run_name"] == "submitted"

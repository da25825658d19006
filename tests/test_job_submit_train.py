"""`ray job submit` of the LoRA tuning job: a one-node Ray cluster on 127.0.0.1 (`ray start --head`), the job
submitted through the Job SDK with the code as its working dir, 2 DeepSpeed ZeRO-2 workers, outputs checked.

The cluster is stopped by signalling the process group of its own `ray start --block` process, which holds
exactly the processes it started (`ray stop` would stop every Ray instance of this user on the machine).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from peft import PeftModel

from binllm import sources, storage
from binllm.codes import code_table
from binllm.config import load_config
from binllm.llm import load_causal_lm
from binllm.tune import TUNE_SUMMARY_FILE
from synthetic import make_planted_examples

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with 2 CPUs and the job API; yields the dashboard URL."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard_port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "GLOO_SOCKET_IFNAME": "lo", "BINLLM_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    # Every port explicit: other Ray instances on this machine may hold the defaults (the job agent's 52365).
    ports = [f"--{name}={free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port", "runtime-env-agent-port")]
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         *ports, "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not come up at {url} (exit code {head.poll()})")
                time.sleep(1)
        yield url
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's own session: its GCS, raylet, dashboard, workers
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def working_dir(tmp_path: Path, config: dict) -> Path:
    """What `ray job submit --working-dir .` ships: the packages and the job's config file."""
    folder = tmp_path / "job"
    for package in ("binllm", "jobs"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "ray_config.yaml").write_text(yaml.safe_dump(config))
    return folder


def submit(client, **job) -> str:
    """submit_job, retried while the head's job agent is still starting ("No available agent")."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


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
    sources.write_examples(cfg, examples, items)
    rng = np.random.default_rng(0)
    codes = sources.codes_uri(cfg)
    storage.write_table(code_table([f"u{k}" for k in range(40)], rng.integers(0, 256, (40, 4), dtype=np.uint8)),
                        f"{codes}/users.parquet")
    storage.write_table(code_table([f"i{k}" for k in range(30)], rng.integers(0, 256, (30, 4), dtype=np.uint8)),
                        f"{codes}/items.parquet")

    client = JobSubmissionClient(ray_head)
    job = submit(client, entrypoint=f"{sys.executable} -m jobs.tune_lora --config ray_config.yaml",
                 runtime_env={"working_dir": str(working_dir(tmp_path, config))})
    deadline = time.monotonic() + 400
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after 400 s:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-5000:]

    adapter = Path(sources.adapter_uri(cfg))
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / TUNE_SUMMARY_FILE).is_file()
    base, _ = load_causal_lm(tiny_llm_dir)
    tuned = PeftModel.from_pretrained(base, adapter)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in tuned.named_parameters())


import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import reliability_report
from ray_cluster import free_port

RAY = Path(sys.executable).with_name("ray")


# The test tiers (README, "Tests"): a test that starts a real part is `integration` (Ray, the S3 server, a job
# submitted to a Ray head) or `model` (runs an LLM: the tiny one, or SmolLM2 in
# test_defaults_learn, which marks itself); every other test is the unit tier,
# which `make test-fast` runs. `make test` runs all of them.
INTEGRATION_FIXTURES = {"ray_local", "ray_head", "s3_server", "s3_bucket"}
MODEL_FIXTURES = {"tiny_llm_dir", "tiny_sentencepiece_llm_dir"}


def pytest_configure(config):
    reliability_report.register(config)  # checks reliability markers; writes $BINLLM_RELIABILITY_REPORT


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(item.fixturenames)
        if used & INTEGRATION_FIXTURES or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        elif used & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)
    # A long module runs first (make test passes --no-loadscope-reorder, so xdist keeps this order): started last,
    # it would run alone on one core after every other module has finished.
    items.sort(key=lambda item: item.get_closest_marker("run_first") is None)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: one intra-op thread is fastest, and a 2-thread team waiting on a
    descheduled thread made tests up to 40x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A tiny random LLaMA + GPT-2 style tokenizer saved as a Hugging Face folder (built once per session)."""
    from binllm.llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), style="bytelevel", seed=0)


@pytest.fixture(scope="session")
def tiny_sentencepiece_llm_dir(tmp_path_factory):
    """Like tiny_llm_dir with a LLaMA/SentencePiece style tokenizer ("▁" word marks, <s> prepended)."""
    from binllm.llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_sp_llm"), style="sentencepiece", seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port); yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the moto server, with the AWS variables pointing at it; yields 's3://<bucket>'."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


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


@pytest.fixture
def restore_logging():
    """cli.main configures the root logger for a job; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)

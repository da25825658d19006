"""MLflow tracking and the adapter registry (binllm.tracking): the training jobs' Ray Train worker functions run in
this process on a LocalBackend (the DeepSpeed backend swapped out: no Ray, the same worker code, rank 0 = the only
rank) into the embedded SQLite store under the run's output root and into a real `mlflow server` on 127.0.0.1;
the score recipe resolves the registered adapter (by alias) back to the very files it was tuned with."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest
from mlflow import MlflowClient

from binllm import prompt_spec, run_steps, sources, storage, tracking
from binllm.config import ConfigError, load_config
from binllm.config.sections import TrackingConfig
from binllm.recipes import pretrain_encoder, score
from binllm.recipes import tune_lora as tune_recipe
from binllm.run_steps import register_adapter
from binllm.train.backend import LocalBackend
from ray_cluster import free_port, local_ray
from synthetic import make_planted_examples

MLFLOW = Path(sys.executable).with_name("mlflow")
MODEL = "binllm-adapter"
TINY = [
    "encoder.max_epochs=3", "encoder.batch_size=256", "encoder.dim=8", "encoder.bits=8", "encoder.patience=5",
    *(f"tune.{stage}.{key}" for stage in ("stage1", "stage2") for key in (
        "max_train_rows=32", "max_valid_rows=16", "micro_batch_size=8", "eval_every=2", "epochs=1")),
]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "binllm_prompt_spec.json", "tune_result.json")


def run_config(root, llm_dir, *overrides):
    return load_config(None, [f"run.output_root={root}", f"llm.model={llm_dir}", *TINY, *overrides])


def train_in_process(cfg, monkeypatch):
    """examples -> pretrain_encoder's worker (codes) -> tune_lora's worker (adapter), each on a LocalBackend."""
    examples, items = make_planted_examples(40, 30, 600, seed=0, history_len=3)
    sources.write_examples(cfg.layout(), examples, items)
    monkeypatch.setattr(pretrain_encoder, "DeepSpeedBackend", lambda *args, **kwargs: LocalBackend())
    monkeypatch.setattr(run_steps, "DeepSpeedBackend", lambda *args, **kwargs: LocalBackend())
    pretrain_encoder.worker({"cfg": cfg})
    tune_recipe.worker({"cfg": cfg})


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_llm_dir):
    """Run r1 trained into the default store (sqlite:///<root>/mlflow.db), its adapter version 1 aliased champion."""
    root = tmp_path_factory.mktemp("tracked")
    cfg = run_config(root, tiny_llm_dir, "run.name=r1")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        train_in_process(cfg, monkeypatch)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    client.set_registered_model_alias(MODEL, "champion", "1")
    return cfg, client


def runs_by_job(client, run_name):
    experiment = client.get_experiment_by_name("binllm")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`binllm.run_name` = '{run_name}'")
    return {r.data.tags["binllm.job"]: r for r in runs}


def test_the_training_jobs_log_config_curves_and_metrics_and_register_the_adapter(tracked_run):
    cfg, client = tracked_run
    runs = runs_by_job(client, "r1")
    assert set(runs) == {"pretrain_encoder", "tune_lora"}
    tuned = runs["tune_lora"]
    assert (tuned.info.run_name, tuned.info.status) == ("r1-tune_lora", "FINISHED")
    params = tuned.data.params
    assert params["tune.stage2.max_train_rows"] == "32" and params["llm.model"] == cfg.llm.model
    assert params["tune.lora.target_modules"] == '["q_proj", "v_proj"]' and params["tracking.experiment"] == "binllm"
    summary = json.loads(Path(cfg.layout().adapter, "tune_result.json").read_text())
    for stage in summary["stages"]:  # the validation history, step by step, as published in tune_result.json
        for metric in ("auc", "loss"):
            curve = client.get_metric_history(tuned.info.run_id, f"{stage['name']}/valid_{metric}")
            expected = [(h["step"], pytest.approx(h[metric])) for h in stage["history"]]
            assert [(m.step, m.value) for m in curve] == expected
        assert [m.step for m in client.get_metric_history(tuned.info.run_id, f"{stage['name']}/valid_auc")] == [2, 4]
    assert tuned.data.metrics["best_auc"] == pytest.approx(summary["best_auc"])
    assert tuned.data.metrics["stage1/steps"] == 4
    encoder = runs["pretrain_encoder"]
    curve = client.get_metric_history(encoder.info.run_id, "encoder/valid_auc")  # one validation per epoch
    assert len(curve) == encoder.data.metrics["encoder/epochs"] == 3 and curve[0].step < curve[-1].step
    assert "encoder/best_auc" in encoder.data.metrics and "encoder.max_epochs" in encoder.data.params

    version = client.get_model_version(MODEL, "1")
    assert version.run_id == tuned.info.run_id and version.tags["binllm.run_name"] == "r1"
    logged = {a.path for a in client.list_artifacts(tuned.info.run_id, "adapter")}
    assert {f"adapter/{name}" for name in (*ADAPTER_FILES, "MLmodel", "codes")} <= logged


def test_the_score_recipe_scores_the_version_an_alias_names(tracked_run):
    cfg, _ = tracked_run
    nightly = load_config(None, [f"run.output_root={cfg.run.output_root}", "run.name=r1", f"llm.model={cfg.llm.model}",
                                 f"tune.adapter=models:/{MODEL}@champion"])
    job = score.scoring_job(nightly)
    # The scores and the manifest carry the version (the pipeline's model_version is score.model_version), the
    # manifest's config the URI as configured.
    assert job.score.model_version == f"models:/{MODEL}/1"
    assert job.config_record["tune"]["adapter"] == f"models:/{MODEL}@champion"
    tuned = Path(cfg.layout().adapter)
    for name in ADAPTER_FILES:
        assert Path(job.layout.adapter, name).read_bytes() == (tuned / name).read_bytes()
    for name in ("users.parquet", "items.parquet"):  # the code tables come with the version
        assert Path(job.layout.codes, name).read_bytes() == Path(cfg.layout().codes, name).read_bytes()
    assert Path(job.layout.codes).parent == Path(job.layout.adapter)
    prompt_spec.check_adapter(job.layout.adapter, nightly.prompt, nightly.llm, nightly.data.history_len, job.layout)


@pytest.mark.integration
def test_a_nightly_run_on_the_registered_adapter_names_the_version_in_its_manifest(tracked_run, tmp_path):
    cfg, _ = tracked_run
    storage.write_table(pa.table({"user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i3"]}),
                        str(tmp_path / "requests.parquet"))
    nightly = load_config(None, [
        f"run.output_root={cfg.run.output_root}", "run.name=r1", f"llm.model={cfg.llm.model}",
        f"tune.adapter=models:/{MODEL}@champion", f"score.requests={tmp_path}/requests.parquet", "score.dt=2026-11-26",
        f"score.output={tmp_path}/scores", "score.cpus_per_actor=0.5", "score.partitions=1", "score.batch_size=16"])
    with local_ray(progress_bars=False):
        summary = score.main(nightly)
    manifest = summary.manifest
    assert manifest["model_version"] == f"models:/{MODEL}/1"
    assert manifest["config"]["tune"]["adapter"] == f"models:/{MODEL}@champion"
    assert manifest["inputs"]["adapter"] == score.scoring_job(nightly).layout.adapter
    scores = storage.read_table(str(tmp_path / "scores" / "dt=2026-11-26"), what="scores")
    assert scores.num_rows == 3 and set(scores.column("model_version").to_pylist()) == {f"models:/{MODEL}/1"}


def test_a_models_uri_the_registry_lacks_names_what_it_holds(tracked_run):
    cfg, _ = tracked_run
    for uri, message in (
            ("models:/nope@champion", f"no registered model 'nope' in sqlite:///.*; registered models: {MODEL}"),
            (f"models:/{MODEL}/9", f"registered model '{MODEL}' has no version 9; versions: 1"),
            (f"models:/{MODEL}@prod", f"registered model '{MODEL}' has no alias 'prod'; aliases: @champion -> 1")):
        bad = load_config(None, [f"run.output_root={cfg.run.output_root}", f"tune.adapter={uri}"])
        with pytest.raises(ConfigError, match=f"^config key 'tune.adapter': {uri}: {message}$"):
            score.scoring_job(bad)


def test_a_rank_other_than_0_and_tracking_off_log_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"run.output_root={tmp_path}", "run.name=r"])
    for settings, is_main in ((TrackingConfig(), False), (TrackingConfig(enabled=False), True)):
        with tracking.job_run(settings, str(tmp_path), run_name="r", job="tune_lora", params=cfg.to_dict(),
                              is_main=is_main) as tracked:
            assert not tracked.active
            tracked.log_metrics({"best_auc": 0.5})
            tracked.log_history("stage1", [{"step": 1, "auc": 0.5, "loss": 0.7}])
            tracked.log_files([str(tmp_path / "missing.png")], "eval")
            assert register_adapter(tracked, cfg.layout(), MODEL) is None  # reads no adapter folder either
    assert sorted(os.listdir(tmp_path)) == []


def test_the_store_uri_and_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.store_uri(TrackingConfig(), str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.store_uri(TrackingConfig(), "s3://bucket/runs") == ""  # not tracked
    assert tracking.store_uri(TrackingConfig(uri="http://127.0.0.1:5000"), "s3://b/r") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert tracking.store_uri(TrackingConfig(), str(tmp_path)) == "http://127.0.0.1:5001"
    cfg = load_config(None, ["run.name=r", "tracking.uri=sqlite:///rel/mlflow.db", "tune.adapter=models:/m@champion"])
    flat = tracking.flatten(cfg.to_dict())
    assert (flat["run.name"], flat["tune.stage1.lr"], flat["data.rating_scale"], flat["tracking.enabled"]) == \
        ("r", "0.001", "null", "true")
    absolute = cfg.with_absolute_paths()  # Ray Train workers run in their own working directory
    assert absolute.tracking.uri == f"sqlite:///{Path.cwd()}/rel/mlflow.db"
    assert absolute.tune.adapter == "models:/m@champion"
    assert tracking.metric_key("IO (binary)", "stage2", "valid_auc") == "IO-binary/stage2/valid_auc"
    assert tracking.metric_key("BinLLM-binary/stage1", "valid_auc") == "BinLLM-binary/stage1/valid_auc"
    assert tracking.redacted("postgresql://mlflow:secret@db/mlflow") == "postgresql://mlflow:***@db/mlflow"


@pytest.mark.parametrize("overrides, message", [
    (["tune.adapter=models:/binllm-adapter"], "config key 'tune.adapter': expected models:/<name>/<version> or"),
    (["tune.adapter=models:/binllm-adapter/Production"], "config key 'tune.adapter': expected models:/"),
    (["tune.adapter=models:/m/1", "score.model_version=v1"], "config keys 'score.model_version' and 'tune.adapter'"),
    (["tracking.uri=postgresql://mlflow:secret@db/mlflow"], "config key 'tracking.uri': credentials are not read"),
    (["tracking.model_name=a/b"], "config key 'tracking.model_name'"),
    (["tracking.experiment="], "config key 'tracking.experiment'"),
])
def test_bad_tracking_keys_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (a free port): SQLite backend, artifacts proxied into a local folder."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "wb") as output:
        server = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
            env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not come up at {url} (exit code {server.poll()}): "
                                       f"{(root / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own session: its uvicorn workers
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.integration
def test_an_mlflow_server_tracks_and_serves_the_registered_adapter(mlflow_server, tiny_llm_dir, tmp_path, monkeypatch):
    cfg = run_config(tmp_path / "runs", tiny_llm_dir, "run.name=r2", f"tracking.uri={mlflow_server}",
                     "tracking.experiment=served")
    train_in_process(cfg, monkeypatch)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("served")
    (tuned,) = client.search_runs([experiment.experiment_id], filter_string="tags.`binllm.job` = 'tune_lora'")
    assert tuned.info.run_name == "r2-tune_lora" and tuned.data.params["tracking.uri"] == mlflow_server
    assert [m.step for m in client.get_metric_history(tuned.info.run_id, "stage2/valid_auc")] == [2, 4]
    assert not (Path(cfg.run.output_root) / "mlflow.db").exists()  # nothing went to the embedded store
    version = client.get_model_version(MODEL, "1")
    assert version.run_id == tuned.info.run_id and version.source.startswith("mlflow-artifacts:/")
    client.set_registered_model_alias(MODEL, "champion", "1")

    monkeypatch.setenv("BINLLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # MLflow's defaults (./mlflow.db, ./mlruns) must never be touched
    nightly = load_config(None, [f"run.output_root={cfg.run.output_root}", "run.name=r2", f"llm.model={tiny_llm_dir}",
                                 f"tracking.uri={mlflow_server}", f"tune.adapter=models:/{MODEL}@champion"])
    job = score.scoring_job(nightly)
    assert job.score.model_version == f"models:/{MODEL}/1"
    assert Path(job.layout.adapter).is_relative_to(tmp_path / "cache")  # downloaded through the server, once
    for name in ADAPTER_FILES:
        assert Path(job.layout.adapter, name).read_bytes() == Path(cfg.layout().adapter, name).read_bytes()
    prompt_spec.check_adapter(job.layout.adapter, nightly.prompt, nightly.llm, nightly.data.history_len, job.layout)
    assert score.scoring_job(nightly).layout.adapter == job.layout.adapter
    assert list((tmp_path / "cwd").iterdir()) == []

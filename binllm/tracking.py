"""MLflow tracking of the jobs, and the model registry that tuned adapters go into and jobs.score reads from.

A tracked job is one MLflow run named `<run.name>-<job>` in the experiment tracking.experiment, tagged
`binllm.run_name` and `binllm.job` so that the jobs of one run are found together. It holds the resolved
config as params (dotted keys), validation curves as metrics at their optimizer step, the final metrics, and
plots and reports as artifacts. One process logs: Ray Train's rank 0 (`job_run(..., is_main=backend.is_main)`);
other ranks get an inactive `JobRun` that logs nothing.

The store: tracking.uri, else $MLFLOW_TRACKING_URI, else MLflow's embedded SQLite store
`sqlite:///<run.output_root>/mlflow.db` with artifacts under `<run.output_root>/mlartifacts` (tracking and the
model registry with no server; `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` shows it). Any MLflow
tracking server works the same (`http://127.0.0.1:5000`). An s3:// output root with neither set is not tracked.

Tuning registers its adapter folder, with its prompt spec (binllm_prompt_spec.json) and the code tables it was
tuned with (codes/), as a version of tracking.model_name; `registered_adapter` resolves
`models:/<name>/<version>` or `models:/<name>@<alias>` back to a folder of those files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

# MLflow reports usage telemetry to servers outside from import time on: off unless the environment turns it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.artifacts import download_artifacts  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model  # noqa: E402

from binllm import storage  # noqa: E402
from binllm.cache import default_cache_dir, file_lock  # noqa: E402
from binllm.config.sections import ConfigError, StorageConfig, TrackingConfig  # noqa: E402

log = logging.getLogger(__name__)
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic")

RUN_TAG, JOB_TAG = "binllm.run_name", "binllm.job"
ADAPTER_ARTIFACT = "adapter"  # the artifact folder of a registered adapter, and its flavor in MLmodel: binllm_adapter
REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_-]+))$")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def is_registered(location: str) -> bool:
    """Whether an adapter location names a registered version (models:/...) rather than a folder."""
    return location.startswith("models:")


def store_uri(tracking: TrackingConfig, output_root: str) -> str:
    """The MLflow tracking and registry URI: tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite
    store under a local output root; "" for an s3:// output root without either (not tracked)."""
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri or storage.is_s3(output_root):
        return uri
    return f"sqlite:///{Path(output_root).absolute() / 'mlflow.db'}"


def resolved(tracking: TrackingConfig, output_root: str) -> TrackingConfig:
    """`tracking` with its store URI resolved here (store_uri): what a driver hands Ray Train workers, whose
    environment may lack the driver's MLFLOW_TRACKING_URI."""
    return dataclasses.replace(tracking, uri=store_uri(tracking, output_root))


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config dict as dotted keys -> text (strings as they are, everything else as JSON)."""
    flat: dict[str, str] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def redacted(text: str) -> str:
    """`text` with the password of any scheme://user:password@host in it replaced by ***: what params, log lines
    and errors show of a URI from the environment (MLFLOW_TRACKING_URI)."""
    return re.sub(r"(://[^/@:\s]*):[^/@\s]*@", r"\1:***@", text)


def metric_key(*parts: str) -> str:
    """A metric name from parts joined by '/', each reduced to the characters MLflow allows ("IO (binary)" ->
    "IO-binary")."""
    return "/".join(re.sub(r"[^\w./-]+", "-", part).strip("-") for part in parts if part)


class JobRun:
    """One MLflow run of a job. An inactive one (tracking off, a Ray Train rank other than 0, no store) logs
    nothing and registers nothing."""

    def __init__(self, client: MlflowClient | None = None, run_id: str = ""):
        self.client, self.run_id = client, run_id

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_params(self, record: dict[str, Any]) -> None:
        """`record` (the resolved config) as params with dotted keys."""
        if self.active:
            params = [Param(k, redacted(v)[:MAX_PARAM_CHARS]) for k, v in sorted(flatten(record).items())]
            self.client.log_batch(self.run_id, params=params)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Finite numbers of `metrics` at `step` (NaN, a method without warm rows say, is left out)."""
        now = int(time.time() * 1000)
        found = [Metric(key, float(value), now, step) for key, value in metrics.items()
                 if isinstance(value, (int, float)) and math.isfinite(value)]
        if self.active and found:
            self.client.log_batch(self.run_id, metrics=found)

    def log_history(self, prefix: str, history: Iterable[dict[str, float]]) -> None:
        """A validation history ({"step": s, "auc": ..., "loss": ...} per validation) as the metrics
        <prefix>/valid_auc, <prefix>/valid_loss, ... at each optimizer step."""
        for entry in history:
            self.log_metrics({metric_key(prefix, f"valid_{k}"): v for k, v in entry.items() if k != "step"},
                             step=int(entry.get("step", 0)))

    def log_report(self, rows: Iterable[dict[str, Any]], prefix: str = "test") -> None:
        """Rows of a metrics report (binllm.metrics.report_table: one per method) as <prefix>/<method>/<column>."""
        for row in rows:
            self.log_metrics({metric_key(prefix, str(row["method"]), k): v for k, v in row.items() if k != "method"})

    def log_files(self, uris: Iterable[str], artifact_path: str, storage_cfg: StorageConfig | None = None) -> None:
        """Files (local or s3://) as artifacts under `artifact_path`; a file that does not exist is left out."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory(prefix="binllm-mlflow-") as tmp:
            for uri in uris:
                if not storage.exists(uri, storage_cfg):
                    log.warning("tracking: %s not found; not logged", uri)
                    continue
                fs, path = storage.filesystem_for(uri, storage_cfg)
                local = Path(tmp, Path(path).name)
                with fs.open_input_stream(path) as source:
                    local.write_bytes(source.read())
                self.client.log_artifact(self.run_id, str(local), artifact_path)

    def register_folder(self, folder: Path, model_name: str, *, metadata: dict[str, Any] | None = None,
                        tags: dict[str, str] | None = None) -> ModelVersion | None:
        """Logs `folder` as the run's `adapter` artifacts (with an MLmodel file naming its flavor, binllm_adapter)
        and registers them as a new version of `model_name`; returns the version (None when inactive)."""
        if not self.active or not model_name:
            return None
        Model(artifact_path=ADAPTER_ARTIFACT, run_id=self.run_id,
              flavors={"binllm_adapter": {"format": "peft-lora", **(metadata or {})}}).save(str(folder / "MLmodel"))
        self.client.log_artifacts(self.run_id, str(folder), ADAPTER_ARTIFACT)
        try:
            self.client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT}"
        version = self.client.create_model_version(model_name, source, run_id=self.run_id, tags=tags)
        log.info("tracking: registered models:/%s/%s (%s)", model_name, version.version, source)
        return version


def _client(uri: str) -> MlflowClient:
    for name in QUIET_LOGGERS:  # their INFO lines on creating a store's tables would break one-line errors
        logging.getLogger(name).setLevel(logging.WARNING)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, name: str, uri: str, output_root: str) -> str:
    """The experiment's id, created when missing; a store without a server keeps a new experiment's artifacts
    under <output_root>/mlartifacts (MLflow's default, ./mlruns, would follow each process's working directory)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ConfigError(f"config key 'tracking.experiment': experiment {name!r} is deleted in {redacted(uri)}; "
                              "restore it (mlflow experiments restore) or name another")
        return found.experiment_id
    served = uri.startswith(("http://", "https://", "databricks"))
    root = None if served else storage.join_uri(output_root, "mlartifacts") if storage.is_s3(output_root) \
        else str(Path(output_root).absolute() / "mlartifacts")
    try:
        return client.create_experiment(name, artifact_location=root)
    except MlflowException as exc:  # another job created it meanwhile
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def job_run(tracking: TrackingConfig, output_root: str, *, run_name: str, job: str,
            params: dict[str, Any] | None = None, is_main: bool = True, started: float | None = None
            ) -> Iterator[JobRun]:
    """The MLflow run `<run_name>-<job>` (started at `started`, a time.time(), default now) with `params` logged;
    ended FINISHED, or FAILED when the body raises. Inactive (nothing created) when tracking is off, for
    is_main False, or when there is no store."""
    uri = store_uri(tracking, output_root) if tracking.enabled and is_main else ""
    if not uri:
        if tracking.enabled and is_main:
            log.warning("tracking: run.output_root %s is on object storage and neither tracking.uri nor "
                        "MLFLOW_TRACKING_URI is set: job %s is not tracked", output_root, job)
        yield JobRun()
        return
    client = _client(uri)
    experiment_id = _experiment_id(client, tracking.experiment, uri, output_root)
    run = client.create_run(experiment_id, start_time=int((started or time.time()) * 1000),
                            tags={RUN_TAG: run_name, JOB_TAG: job}, run_name=f"{run_name}-{job}")
    log.info("tracking: MLflow run %s-%s (%s) in experiment %r at %s", run_name, job, run.info.run_id,
             tracking.experiment, redacted(uri))
    tracked, status = JobRun(client, run.info.run_id), "FAILED"
    try:
        if params is not None:
            tracked.log_params(params)
        yield tracked
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)


@dataclass(frozen=True)
class RegisteredAdapter:
    """A registered adapter version that a models:/ URI names, and where its files are."""

    uri: str  # as configured: models:/<name>/<version> or models:/<name>@<alias>
    name: str
    version: str
    alias: str  # "" for a URI by version
    source: str  # the version's artifact location in the MLflow store
    run_id: str  # the tuning job's MLflow run
    location: str  # a folder (local path or s3://) with the adapter, binllm_prompt_spec.json and codes/

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registered_adapter(uri: str, tracking: TrackingConfig, output_root: str,
                       storage_cfg: StorageConfig | None = None) -> RegisteredAdapter:
    """Resolves `uri` through the registry of `store_uri(tracking, output_root)`. The files: the version's own
    folder when it is an s3:// prefix or a local folder, else a copy in this node's cache (downloaded once;
    versions never change); with an s3:// output root a node-local folder is copied to
    <output_root>/registry/<name>/<version>, where scoring actors on every node read it. A name, version or
    alias the registry does not hold is a ConfigError naming tune.adapter and what the registry holds."""
    store = store_uri(tracking, output_root)
    if not store:
        raise ConfigError(f"config key 'tune.adapter': {uri} needs a model registry: set tracking.uri (or "
                          "MLFLOW_TRACKING_URI), or use a local run.output_root")
    client = _client(store)
    found, alias = _resolved_version(client, uri, store)
    name, version = found.name, str(found.version)
    source = client.get_model_version_download_uri(name, version)
    local = source[len("file://"):] if source.startswith("file://") else source
    if storage.is_s3(source):
        location = source
    else:
        folder = Path(local) if Path(local).is_absolute() and Path(local).is_dir() else _download(store, source)
        location = _shared(folder, name, version, output_root, storage_cfg)
    adapter = RegisteredAdapter(uri, name, version, alias, found.source, found.run_id or "", location)
    log.info("tune.adapter %s: %s (run %s) at %s", uri, adapter.version_uri, adapter.run_id, location)
    return adapter


def _resolved_version(client: MlflowClient, uri: str, store: str) -> tuple[ModelVersion, str]:
    """(the version, the alias or "") that a models:/ URI names, checked against the registry."""
    match = REGISTERED.match(uri)
    if match is None:
        raise ConfigError(f"config key 'tune.adapter': expected models:/<name>/<version> or models:/<name>@<alias>, "
                          f"got {uri!r}")
    name, version, alias = match["name"], match["version"] or "", match["alias"] or ""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise ConfigError(f"config key 'tune.adapter': {uri}: no registered model {name!r} in {redacted(store)}; "
                          f"registered models: {', '.join(names) or 'none'}") from None
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    if alias and alias not in aliases:
        shown = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        raise ConfigError(f"config key 'tune.adapter': {uri}: registered model {name!r} has no alias {alias!r}; "
                          f"aliases: {shown}")
    version = aliases.get(alias, version)
    try:
        return client.get_model_version(name, version), alias
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise ConfigError(f"config key 'tune.adapter': {uri}: registered model {name!r} has no version {version}; "
                          f"versions: {', '.join(map(str, versions)) or 'none'}") from None


def _download(store: str, source: str) -> Path:
    """This node's copy of a registered version's files (BINLLM_CACHE/mlflow/...), downloaded once from the
    version's artifact URI (an mlflow-artifacts:/ URI resolves against the store's server)."""
    root = default_cache_dir() / "mlflow"
    key = hashlib.sha256(f"{store}|{source}".encode()).hexdigest()[:24]
    folder = root / key
    with file_lock(root / f"{key}.lock"):
        if (folder / "adapter_config.json").is_file():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            # models:/ URIs would resolve through the process's default registry, whatever registry_uri says
            got = Path(download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=store))
            if folder.exists():
                shutil.rmtree(folder)
            got.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _shared(folder: Path, name: str, version: str, output_root: str, storage_cfg: StorageConfig | None) -> str:
    """`folder` itself, or with an s3:// output root its copy at <output_root>/registry/<name>/<version>."""
    if not storage.is_s3(output_root):
        return str(folder)
    shared = storage.join_uri(output_root, "registry", name, version)
    if not storage.exists(storage.join_uri(shared, "adapter_config.json"), storage_cfg):
        storage.upload_dir(folder, shared, storage_cfg, last=("adapter_config.json",))
    return shared

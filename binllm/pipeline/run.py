"""The nightly scoring job as a Ray Data pipeline.

    interactions ─ normalise ─┐
    requests | active users ──┴ union ─ hash-partition by user ─ histories, candidates, prompts
        ─ Scorer actor pool (one LLM per actor) ─ Parquet under <output>/dt=D/run=R/ ─ health report ─ manifest
        ─ publish

A rerun of a date writes a fresh run folder and replaces the live one only when the pointer manifest
flips (see binllm.pipeline.publish), so readers never see a partial or doubled result. Before it publishes,
a run's scores are compared with the previous published date (binllm.pipeline.health: quantiles, PSI, top-K
overlap, a PNG); with score.max_psi set, a run that drifted further fails unpublished. With score.sink:
iceberg the run's files go into an Iceberg table's location instead and one snapshot replaces the date
(binllm.pipeline.iceberg_sink); the manifest then records the snapshot. No configuration
can hang it: an actor pool the cluster cannot hold beside the read and join tasks is refused before any
work, and an execution without progress for score.stall_timeout_s fails naming the stage
(binllm.pipeline.watchdog).

The score recipe builds a `ScoringJob` (the configuration sections a run reads) and calls `run_scoring`;
each scoring actor receives a `ScorerSpec` (the model, adapter, storage and scoring settings only).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from binllm import prompt_spec, sources, storage
from binllm.config import LLMConfig, PromptConfig, RunLayout, ScoreConfig, StorageConfig
from binllm.llm import load_tokenizer
from binllm.pipeline import health
from binllm.pipeline.iceberg_sink import IcebergSink, with_dt
from binllm.pipeline.inputs import (InputError, ScoringInputs, check_code_tables, check_model_folders, check_schema,
                                    parquet_paths, resolve_inputs)
from binllm.pipeline.pairs import PairSpec, build_pairs, normalise_log, normalise_requests, normalise_users
from binllm.pipeline.publish import (check_run_id, previous_published_date, publish_partition, read_manifest,
                                     read_partition, record_partition, remove_stale_runs, run_uri, start_run)
from binllm.pipeline.scorer import Scorer, ScorerSpec
from binllm.pipeline.watchdog import ensure_resources, release_resources
from binllm.pipeline.watchdog import install as install_watchdog

logger = logging.getLogger(__name__)

PAIRS_PER_PARTITION = 4096  # default partition count: about this many pairs per user-keyed block
POPULAR_EXTRA = 1000  # popularity fallback ranks top_k + this many items; users who saw more get fewer


@dataclass(frozen=True)
class ScoringJob:
    """What a nightly scoring run reads, section by section; the score recipe builds it from the configuration."""

    score: ScoreConfig  # inputs, output, date, actor pool, batch sizes
    llm: LLMConfig  # the base model and its answer tokens
    prompt: PromptConfig
    history_len: int  # data.history_len: positives per user history
    min_rating: float  # data.min_rating: a logged rating at or above it is a positive (logs without a label)
    run_name: str  # run.name: the prefix of each run id
    layout: RunLayout  # the run folder, prepared examples, code tables, adapter and storage settings
    config_record: dict = field(default_factory=dict)  # the job's whole configuration, recorded in the manifest


@dataclass
class ScoringSummary:
    run_id: str
    dt: str
    output: str
    rows_in: int  # requests, or active users in candidate mode
    rows_out: int
    fallbacks: int
    seconds: float
    pairs_per_s: float
    manifest: dict
    snapshot_id: int | None = None  # the Iceberg sink's snapshot of this run (score.sink: iceberg)

    def line(self) -> str:
        where = (f"committed snapshot {self.snapshot_id} of Iceberg table {self.manifest['iceberg']['table']} "
                 f"(dt={self.dt}, run {self.run_id})" if self.snapshot_id is not None
                 else f"published {self.output}/dt={self.dt} run {self.run_id}")
        psi = self.manifest["health"]["drift"]["psi"]
        drift = f"PSI {psi:.4f} vs dt={self.manifest['health']['drift']['previous_dt']}" if psi is not None \
            else "no previous date"
        return (f"scored {self.rows_out} pairs ({self.fallbacks} text-only fallbacks) from {self.rows_in} "
                f"{'requests' if self.manifest['mode'] == 'requests' else 'active users'} in {self.seconds:.1f} s "
                f"({self.pairs_per_s:.1f} pairs/s; {drift}); {where}")


def code_version() -> str:
    try:
        version = metadata.version("binllm")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def _read(uri: str, what: str, columns: list[str], storage_cfg: StorageConfig) -> ray.data.Dataset:
    fs, paths = parquet_paths(uri, what, storage_cfg)
    return ray.data.read_parquet(paths, filesystem=fs, partitioning=None).select_columns(columns)


def _popular_items(log: ray.data.Dataset, top_k: int) -> list[str]:
    """The top_k + POPULAR_EXTRA item ids of the normalised log (rows before the cutoff) by interaction
    count, most first, ties by id; counted by Ray Data, so the log never has to fit on the driver."""
    counts = log.select_columns(["item_id"]).groupby("item_id").count()
    ranked = counts.sort(["count()", "item_id"], descending=[True, False])
    return [row["item_id"] for row in ranked.take(top_k + POPULAR_EXTRA)]


def _requests_dataset(inputs: ScoringInputs, storage_cfg: StorageConfig) -> tuple[ray.data.Dataset, str]:
    if inputs.requests:
        check_schema(inputs.requests, "scoring requests", ["user_id", "item_id"], storage_cfg)
        return _read(inputs.requests, "scoring requests", ["user_id", "item_id"], storage_cfg).map_batches(
            normalise_requests, batch_format="pyarrow"), "requests"
    users = inputs.users or inputs.user_codes
    column = "user_id" if inputs.users else "id"
    check_schema(users, "active users" if inputs.users else "user code table", [column], storage_cfg)
    ds = _read(users, "active users", [column], storage_cfg)
    if column != "user_id":
        ds = ds.rename_columns({column: "user_id"})
    return ds.map_batches(normalise_users, batch_format="pyarrow"), "candidates"


def run_scoring(job: ScoringJob) -> ScoringSummary:
    """Scores the configured pairs for date job.score.dt and publishes them; see the module docstring.

    Before any work, the actor pool is checked against the cluster's resources (ConfigError when it would leave
    the read and join tasks no CPU; a joined cluster is first asked to grow, see ensure_resources); an execution
    that makes no progress for score.stall_timeout_s fails with PipelineStalled naming the stage
    (binllm.pipeline.watchdog)."""
    start = time.perf_counter()
    checked = _check(job)  # on the driver, before any Ray work: bad inputs are refused without a cluster
    requested = ensure_resources(job.score, joined=bool(os.environ.get("RAY_ADDRESS")))
    restore = install_watchdog(job.score.stall_timeout_s)
    try:
        return _score(checked, start)
    finally:
        restore()
        if requested:
            release_resources()


@dataclasses.dataclass
class _Checked:
    """A scoring run's inputs, checked on the driver."""
    job: ScoringJob  # with the resolved storage credentials for workers on other nodes
    inputs: ScoringInputs
    run_id: str
    log_schema: pa.Schema
    adapter: str
    checksums: dict[str, str]
    tokenizer: object
    model_version: str
    sink: IcebergSink | None  # None: the Parquet sink

    @property
    def storage_cfg(self) -> StorageConfig:
        return self.job.layout.storage


def _check(job: ScoringJob) -> _Checked:
    # Workers on other nodes may lack this process's AWS variables: hand them the resolved settings.
    layout = dataclasses.replace(job.layout, storage=storage.with_credentials(job.layout.storage))
    job = dataclasses.replace(job, layout=layout)
    storage_cfg, llm = layout.storage, job.llm
    inputs = resolve_inputs(job.score, layout)
    run_id = check_run_id(f"{job.run_name}-{uuid.uuid4().hex[:8]}")
    log_schema = check_schema(inputs.interactions, "interaction log", ["user_id", "item_id", "timestamp"],
                              storage_cfg, one_of=["label", "rating"])
    check_schema(inputs.items, "item catalog", ["item_id", "title"], storage_cfg)
    check_code_tables(inputs.user_codes, inputs.item_codes, storage_cfg)
    adapter = layout.adapter
    storage.require_exists(adapter, "LoRA adapter", storage_cfg)
    check_model_folders(llm.model, adapter, storage_cfg)
    model_dir = sources.model_folder(llm.model, storage_cfg)  # this node's copy of an s3:// model: the same checksum
    checksums = {"model": storage.dir_checksum(str(model_dir), storage_cfg),
                 "adapter": storage.dir_checksum(adapter, storage_cfg)}
    prompt_spec.check_adapter(adapter, job.prompt, llm, job.history_len, layout, base_model_sha256=checksums["model"])
    tokenizer = load_tokenizer(model_dir, trust_remote_code=llm.trust_remote_code)
    model_version = job.score.model_version or f"adapter-{checksums['adapter'][:12]}"
    health.check_settings(job.score)
    sink = IcebergSink.open(job.score, inputs.output, storage_cfg) if job.score.sink == "iceberg" else None
    return _Checked(job, inputs, run_id, log_schema, adapter, checksums, tokenizer, model_version, sink)


def _pairs(checked: _Checked) -> tuple[ray.data.Dataset, int, str]:
    """(pairs with their prompts, requests or active users read, mode): the per-user join of the log with them."""
    job, inputs = checked.job, checked.inputs
    log_columns = ["user_id", "item_id", "timestamp", "label" if "label" in checked.log_schema.names else "rating"]
    log = _read(inputs.interactions, "interaction log", log_columns, checked.storage_cfg).map_batches(
        normalise_log, batch_format="pyarrow",
        fn_kwargs={"history_before": inputs.history_before, "min_rating": job.min_rating})
    wanted, mode = _requests_dataset(inputs, checked.storage_cfg)
    rows_in = wanted.count()
    logger.info("scoring %d %s for dt=%s as run %s", rows_in, mode, inputs.dt, checked.run_id)
    spec = PairSpec(
        key=checked.run_id, items=inputs.items, user_codes=inputs.user_codes, item_codes=inputs.item_codes,
        storage=checked.storage_cfg, prompt=job.prompt, history_len=job.history_len, top_k=job.score.top_k,
        popular=_popular_items(log, job.score.top_k) if mode == "candidates" else [], tokenizer=checked.tokenizer,
    )
    pairs_expected = rows_in * (job.score.top_k if mode == "candidates" else 1)
    partitions = job.score.partitions or max(job.score.num_actors, -(-pairs_expected // PAIRS_PER_PARTITION))
    pairs = log.union(wanted).repartition(partitions, keys=["user_id"], sort=True).map_batches(
        build_pairs, batch_size=None, batch_format="pyarrow", fn_kwargs={"spec": spec})
    return pairs, rows_in, mode


def _scored(checked: _Checked, pairs: ray.data.Dataset) -> ray.data.Dataset:
    """The pairs through the pool of Scorer actors (one LLM each)."""
    score = checked.job.score
    spec = ScorerSpec.for_score(score, checked.job.llm, checked.storage_cfg, adapter=checked.adapter,
                                model_version=checked.model_version, run_id=checked.run_id)
    return pairs.map_batches(
        Scorer,
        fn_constructor_args=(spec,),
        batch_size=score.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=score.num_actors),
        num_cpus=score.cpus_per_actor,
        num_gpus=score.gpus_per_actor or None,
    )


@dataclass
class _Staged:
    """A run's written, checked and not yet published scores."""
    data_uri: str  # its Parquet files: the run folder, or (Iceberg sink) a folder in the table's location
    rows: int
    fallbacks: int
    health: dict  # the manifest's `health` field


def _previous_date(checked: _Checked) -> health.PreviousDate | None:
    """The newest published date before the run's, with its live run's rows (from the Parquet files its manifest
    names, or from the Iceberg table for a date the Iceberg sink published); None when there is none."""
    output, dt, storage_cfg = checked.inputs.output, checked.inputs.dt, checked.storage_cfg
    previous = previous_published_date(output, dt, storage_cfg)
    if previous is None:
        return None
    manifest = read_manifest(output, previous, storage_cfg)
    if manifest.get("sink") == "iceberg":
        sink = checked.sink or IcebergSink.open(checked.job.score, output, storage_cfg)
        rows = sink.read_date(previous, health.COLUMNS)
    else:
        rows = read_partition(output, previous, storage_cfg, columns=health.COLUMNS)
    return health.PreviousDate(previous, manifest["run_id"], rows)


def _check_health(checked: _Checked, staged: pa.Table) -> dict:
    """The run's health report (binllm.pipeline.health); DriftTooLarge past score.max_psi, else the histogram PNG
    goes into the run folder and is named in the report."""
    inputs, score = checked.inputs, checked.job.score
    previous = _previous_date(checked)
    report = health.health_report(staged, previous, inputs.dt, score.drift_top_k)
    health.check_drift(report, score.max_psi, inputs.dt)
    storage.write_bytes(health.drift_png(staged, previous, report, inputs.dt),
                        storage.join_uri(run_uri(inputs.output, inputs.dt, checked.run_id), health.HEALTH_PLOT),
                        checked.storage_cfg)
    report["plot"] = f"dt={inputs.dt}/run={checked.run_id}/{health.HEALTH_PLOT}"
    return report


def _discard(checked: _Checked, data_uri: str) -> None:
    """An unpublished run's folder (and its files in the table's location) must not linger where readers look."""
    run_dir = run_uri(checked.inputs.output, checked.inputs.dt, checked.run_id)
    storage.delete_dir(run_dir, checked.storage_cfg)
    if data_uri != run_dir:
        storage.delete_dir(data_uri, checked.storage_cfg)


def _write_run(checked: _Checked, scored: ray.data.Dataset, rows_in: int, mode: str) -> _Staged:
    """Writes the scores (unpublished) and checks them: the health report, score.max_psi. Everything written is
    removed when anything fails, and when there is nothing to score."""
    inputs, storage_cfg = checked.inputs, checked.storage_cfg
    data_uri = checked.sink.data_uri(inputs.dt, checked.run_id) if checked.sink \
        else run_uri(inputs.output, inputs.dt, checked.run_id)
    try:
        start_run(inputs.output, inputs.dt, checked.run_id, storage_cfg)
        if checked.sink:  # the partition column, read from the files' statistics when they are committed
            scored = scored.map_batches(with_dt, batch_format="pyarrow", fn_kwargs={"dt": inputs.dt})
        fs, data_path = storage.filesystem_for(data_uri, storage_cfg)
        scored.write_parquet(data_path, filesystem=fs)
        files = [i.path for i in storage.list_files(data_uri, storage_cfg) if i.path.endswith(".parquet")]
        columns = [*health.COLUMNS, "fallback"]
        staged = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns) if files else None
        if staged is None or staged.num_rows == 0:
            raise InputError(f"nothing to score for dt={inputs.dt}: {rows_in} {mode} gave no pairs; "
                             "the date's published result is left as it was")
        report = _check_health(checked, staged)
    except BaseException:
        _discard(checked, data_uri)
        raise
    return _Staged(data_uri, staged.num_rows, int(pc.sum(staged.column("fallback")).as_py() or 0), report)


def _publish(checked: _Checked, staged: _Staged, fields: dict) -> tuple[dict, int | None]:
    """(manifest, Iceberg snapshot id or None): the Parquet sink's publish protocol, or the Iceberg commit (one
    snapshot; nothing committed and the files removed when it fails) followed by the date's manifest."""
    inputs, storage_cfg = checked.inputs, checked.storage_cfg
    if checked.sink is None:
        return publish_partition(inputs.output, inputs.dt, checked.run_id, fields, storage_cfg), None
    try:
        snapshot_id = checked.sink.commit(inputs.dt, checked.run_id, staged.data_uri, storage_cfg,
                                          {"binllm.model_version": checked.model_version})
    except BaseException:
        _discard(checked, staged.data_uri)
        raise
    fields = fields | {"iceberg": checked.sink.record() | {"snapshot_id": snapshot_id, "data_dir": staged.data_uri}}
    return record_partition(inputs.output, inputs.dt, checked.run_id, fields, staged.rows, storage_cfg), snapshot_id


def _score(checked: _Checked, start: float) -> ScoringSummary:
    job, inputs, run_id = checked.job, checked.inputs, checked.run_id
    pairs, rows_in, mode = _pairs(checked)
    staged = _write_run(checked, _scored(checked, pairs), rows_in, mode)
    seconds = time.perf_counter() - start
    manifest, snapshot_id = _publish(checked, staged, {
        "mode": mode,
        "sink": job.score.sink,
        "inputs": {k: v for k, v in dataclasses.asdict(inputs).items() if k not in ("output", "dt")}
        | {"model": job.llm.model, "adapter": checked.adapter},
        "checksums": checked.checksums,
        "model_version": checked.model_version,
        "config": job.config_record,
        "code_version": code_version(),
        "summary": {"rows_in": rows_in, "rows_out": staged.rows, "fallbacks": staged.fallbacks,
                    "seconds": round(seconds, 3)},
        "health": staged.health,
    })
    remove_stale_runs(inputs.output, job.score.stale_run_hours, checked.storage_cfg)
    summary = ScoringSummary(run_id, inputs.dt, inputs.output, rows_in, staged.rows, staged.fallbacks, seconds,
                             staged.rows / seconds if seconds > 0 else 0.0, manifest, snapshot_id)
    logger.info(summary.line())
    return summary

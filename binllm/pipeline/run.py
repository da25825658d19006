"""The nightly scoring job as a Ray Data pipeline.

    interactions ─ normalise ─┐
    requests | active users ──┴ union ─ hash-partition by user ─ histories, candidates, prompts
        ─ Scorer actor pool (one LLM per actor) ─ Parquet under <output>/dt=D/run=R/ ─ manifest ─ publish

A rerun of a date writes a fresh run folder and replaces the live one only when the pointer manifest
flips (see binllm.storage), so readers never see a partial or doubled result. No configuration can hang it:
an actor pool the cluster cannot hold beside the read and join tasks is refused before any work, and an
execution without progress for score.stall_timeout_s fails naming the stage (binllm.pipeline.watchdog).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from binllm import prompt_spec, sources, storage
from binllm.config import Config
from binllm.llm import load_tokenizer
from binllm.pipeline.inputs import (InputError, ScoringInputs, check_code_tables, check_model_folders, check_schema,
                                    parquet_paths, resolve_inputs)
from binllm.pipeline.pairs import PairSpec, build_pairs, normalise_log, normalise_requests, normalise_users
from binllm.pipeline.scorer import Scorer, ScorerSpec
from binllm.pipeline.watchdog import ensure_resources, release_resources
from binllm.pipeline.watchdog import install as install_watchdog

logger = logging.getLogger(__name__)

PAIRS_PER_PARTITION = 4096  # default partition count: about this many pairs per user-keyed block
POPULAR_EXTRA = 1000  # popularity fallback ranks top_k + this many items; users who saw more get fewer


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

    def line(self) -> str:
        return (f"scored {self.rows_out} pairs ({self.fallbacks} text-only fallbacks) from {self.rows_in} "
                f"{'requests' if self.manifest['mode'] == 'requests' else 'active users'} in {self.seconds:.1f} s "
                f"({self.pairs_per_s:.1f} pairs/s); published {self.output}/dt={self.dt} run {self.run_id}")


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


def _read(uri: str, what: str, columns: list[str], cfg: Config) -> ray.data.Dataset:
    fs, paths = parquet_paths(uri, what, cfg.storage)
    return ray.data.read_parquet(paths, filesystem=fs, partitioning=None).select_columns(columns)


def _popular_items(log: ray.data.Dataset, cfg: Config) -> list[str]:
    """The top_k + POPULAR_EXTRA item ids of the normalised log (rows before the cutoff) by interaction
    count, most first, ties by id; counted by Ray Data, so the log never has to fit on the driver."""
    counts = log.select_columns(["item_id"]).groupby("item_id").count()
    ranked = counts.sort(["count()", "item_id"], descending=[True, False])
    return [row["item_id"] for row in ranked.take(cfg.score.top_k + POPULAR_EXTRA)]


def _requests_dataset(inputs: ScoringInputs, cfg: Config) -> tuple[ray.data.Dataset, str]:
    if inputs.requests:
        check_schema(inputs.requests, "scoring requests", ["user_id", "item_id"], cfg.storage)
        return _read(inputs.requests, "scoring requests", ["user_id", "item_id"], cfg).map_batches(
            normalise_requests, batch_format="pyarrow"), "requests"
    users = inputs.users or inputs.user_codes
    column = "user_id" if inputs.users else "id"
    check_schema(users, "active users" if inputs.users else "user code table", [column], cfg.storage)
    ds = _read(users, "active users", [column], cfg)
    if column != "user_id":
        ds = ds.rename_columns({column: "user_id"})
    return ds.map_batches(normalise_users, batch_format="pyarrow"), "candidates"


def run_scoring(cfg: Config) -> ScoringSummary:
    """Scores the configured pairs for date cfg.score.dt and publishes them; see the module docstring.

    Before any work, the actor pool is checked against the cluster's resources (ConfigError when it would leave
    the read and join tasks no CPU; a joined cluster is first asked to grow, see ensure_resources); an execution
    that makes no progress for score.stall_timeout_s fails with PipelineStalled naming the stage
    (binllm.pipeline.watchdog)."""
    start = time.perf_counter()
    checked = _check(cfg)  # on the driver, before any Ray work: bad inputs are refused without a cluster
    requested = ensure_resources(cfg, joined=bool(os.environ.get("RAY_ADDRESS")))
    restore = install_watchdog(cfg.score.stall_timeout_s)
    try:
        return _score(checked, start)
    finally:
        restore()
        if requested:
            release_resources()


@dataclasses.dataclass
class _Checked:
    """A scoring run's inputs, checked on the driver."""
    cfg: Config  # with the resolved storage credentials for workers on other nodes
    config_record: dict
    inputs: ScoringInputs
    run_id: str
    log_schema: pa.Schema
    adapter: str
    checksums: dict[str, str]
    tokenizer: object
    model_version: str


def _check(cfg: Config) -> _Checked:
    config_record = cfg.to_dict()  # holds no credentials: configs cannot carry them
    # Workers on other nodes may lack this process's AWS variables: hand them the resolved settings.
    cfg = dataclasses.replace(cfg, storage=storage.with_credentials(cfg.storage))
    inputs = resolve_inputs(cfg)
    run_id = storage.check_run_id(f"{cfg.run.name}-{uuid.uuid4().hex[:8]}")
    log_schema = check_schema(inputs.interactions, "interaction log", ["user_id", "item_id", "timestamp"],
                              cfg.storage, one_of=["label", "rating"])
    check_schema(inputs.items, "item catalog", ["item_id", "title"], cfg.storage)
    check_code_tables(inputs.user_codes, inputs.item_codes, cfg.storage)
    adapter = sources.adapter_uri(cfg)
    storage.require_exists(adapter, "LoRA adapter", cfg.storage)
    check_model_folders(cfg.llm.model, adapter, cfg.storage)
    model_dir = sources.model_folder(cfg.llm.model, cfg)  # this node's copy of an s3:// model: the same checksum
    checksums = {"model": storage.dir_checksum(str(model_dir), cfg.storage),
                 "adapter": storage.dir_checksum(adapter, cfg.storage)}
    prompt_spec.check_adapter(adapter, cfg, base_model_sha256=checksums["model"])
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.llm.trust_remote_code)
    model_version = cfg.score.model_version or f"adapter-{checksums['adapter'][:12]}"
    return _Checked(cfg, config_record, inputs, run_id, log_schema, adapter, checksums, tokenizer, model_version)


def _score(checked: _Checked, start: float) -> ScoringSummary:
    cfg, inputs, run_id, adapter = checked.cfg, checked.inputs, checked.run_id, checked.adapter
    log_schema, tokenizer, model_version = checked.log_schema, checked.tokenizer, checked.model_version
    log_columns = ["user_id", "item_id", "timestamp", "label" if "label" in log_schema.names else "rating"]
    log = _read(inputs.interactions, "interaction log", log_columns, cfg).map_batches(
        normalise_log, batch_format="pyarrow",
        fn_kwargs={"history_before": inputs.history_before, "min_rating": cfg.data.min_rating})
    wanted, mode = _requests_dataset(inputs, cfg)
    rows_in = wanted.count()
    logger.info("scoring %d %s for dt=%s as run %s", rows_in, mode, inputs.dt, run_id)

    spec = PairSpec(
        key=run_id, items=inputs.items, user_codes=inputs.user_codes, item_codes=inputs.item_codes,
        storage=cfg.storage, prompt=cfg.prompt, history_len=cfg.data.history_len, top_k=cfg.score.top_k,
        popular=_popular_items(log, cfg) if mode == "candidates" else [], tokenizer=tokenizer,
    )
    pairs_expected = rows_in * (cfg.score.top_k if mode == "candidates" else 1)
    partitions = cfg.score.partitions or max(cfg.score.num_actors, -(-pairs_expected // PAIRS_PER_PARTITION))
    pairs = log.union(wanted).repartition(partitions, keys=["user_id"], sort=True).map_batches(
        build_pairs, batch_size=None, batch_format="pyarrow", fn_kwargs={"spec": spec})
    gpus = cfg.score.gpus_per_actor or None
    scored = pairs.map_batches(
        Scorer,
        fn_constructor_args=(ScorerSpec(cfg, adapter, model_version, run_id),),
        batch_size=cfg.score.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.score.num_actors),
        num_cpus=cfg.score.cpus_per_actor,
        num_gpus=gpus,
    )
    run_dir = storage.run_uri(inputs.output, inputs.dt, run_id)
    try:
        storage.start_run(inputs.output, inputs.dt, run_id, cfg.storage)
        fs, run_path = storage.filesystem_for(run_dir, cfg.storage)
        scored.write_parquet(run_path, filesystem=fs)
        staged = [i.path for i in storage.list_files(run_dir, cfg.storage) if i.path.endswith(".parquet")]
        fallback = (pads.dataset(staged, filesystem=fs, format="parquet").to_table(columns=["fallback"]).column("fallback")
                    if staged else [])
        if len(fallback) == 0:
            raise InputError(f"nothing to score for dt={inputs.dt}: {rows_in} {mode} gave no pairs; "
                             "the date's published result is left as it was")
    except BaseException:
        # An unpublished run folder must not linger where plain hive readers of <output> would see it.
        storage.delete_dir(run_dir, cfg.storage)
        raise
    rows_out, fallbacks = len(fallback), int(pc.sum(fallback).as_py() or 0)
    seconds = time.perf_counter() - start
    manifest = storage.publish_partition(inputs.output, inputs.dt, run_id, {
        "mode": mode,
        "inputs": {k: v for k, v in dataclasses.asdict(inputs).items() if k not in ("output", "dt")}
        | {"model": cfg.llm.model, "adapter": adapter},
        "checksums": checked.checksums,
        "model_version": model_version,
        "config": checked.config_record,
        "code_version": code_version(),
        "summary": {"rows_in": rows_in, "rows_out": rows_out, "fallbacks": fallbacks, "seconds": round(seconds, 3)},
    }, cfg.storage)
    storage.remove_stale_runs(inputs.output, cfg.score.stale_run_hours, cfg.storage)
    summary = ScoringSummary(run_id, inputs.dt, inputs.output, rows_in, rows_out, fallbacks, seconds,
                             rows_out / seconds if seconds > 0 else 0.0, manifest)
    logger.info(summary.line())
    return summary

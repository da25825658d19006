"""The steps of a run that several recipes share: preparing the examples, publishing the encoder's code
tables, reading a tuning run's inputs, publishing a tuned adapter, and recording training results in MLflow
(curves, final metrics, the adapter registered with its prompt spec and code tables)."""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from binllm import assets, sources, storage
from binllm.config import DataConfig, DistributedConfig, LLMConfig, PromptConfig, RunLayout, StorageConfig, TuneConfig
from binllm.data import prepare_examples, read_grouplens, read_recbole, read_table
from binllm.data.profile import PROFILE_FILE, build_profile, check_trainable, format_profile
from binllm.data.schema import DataError
from binllm.encoder import EncoderResult, export_codes, save_encoder, write_code_tables
from binllm.llm import save_adapter
from binllm.prompt_spec import SPEC_FILE
from binllm.tracking import JobRun
from binllm.train.deepspeed_config import llm_precision
from binllm.train.distributed import DeepSpeedBackend
from binllm.tune import TuneResult, tune_lora

log = logging.getLogger(__name__)

TUNE_SUMMARY_FILE = "tune_result.json"


def load_interactions(data: DataConfig, storage_cfg: StorageConfig) -> tuple[pa.Table, pa.Table]:
    """(interactions, items) from the data section, normalised (see binllm.data.schema)."""
    if data.format in ("demo_ml100k", "demo_ml1m"):
        return read_recbole(assets.movielens_100k() if data.format == "demo_ml100k" else assets.movielens_1m())
    if data.format in ("recbole", "grouplens"):
        if not data.path:
            raise DataError(f"config key 'data.path': required for data.format '{data.format}' (a local folder)")
        return read_recbole(data.path) if data.format == "recbole" else read_grouplens(data.path)
    if not data.interactions or not data.items:
        raise DataError("config keys 'data.interactions' and 'data.items': required for data.format 'table'")
    inter_fs, inter_path = storage.filesystem_for(data.interactions, storage_cfg)
    items_fs, items_path = storage.filesystem_for(data.items, storage_cfg)
    return read_table(inter_path, items_path, data.columns, filesystem=inter_fs, items_filesystem=items_fs)


def sources_named(data: DataConfig) -> tuple[str, str]:
    """(interaction log, item catalog) as errors name them."""
    if data.format in ("demo_ml100k", "demo_ml1m"):
        name = f"the demo data ({data.format})"
        return name, name
    if data.format in ("recbole", "grouplens"):
        return data.path, data.path
    return data.interactions, data.items


def prepare_run(data: DataConfig, layout: RunLayout) -> tuple[pa.Table, pa.Table]:
    """Reads the source, prepares the examples and their profile, refuses (DataError naming the key, column or
    file) what cannot train, then writes examples.parquet, items.parquet and profile.json at layout.examples and
    prints the profile. Returns (examples, items)."""
    started = time.perf_counter()
    interactions, items = load_interactions(data, layout.storage)
    source, items_source = sources_named(data)
    report: dict = {}
    examples = prepare_examples(interactions, data, source=source, report=report)
    profile = build_profile(examples, items, report, data)
    check_trainable(profile, data, source, items_source)
    uri = sources.write_examples(layout, examples, items)
    profile_uri = storage.join_uri(uri, PROFILE_FILE)
    storage.write_json(profile, profile_uri, layout.storage)
    print(format_profile(profile, profile_uri), flush=True)
    counts = {s["values"]: s["counts"] for s in examples.column("split").value_counts().to_pylist()}
    log.info("prepared %d of %d interactions (%s), positive rate %.3f, in %.1fs -> %s",
             examples.num_rows, interactions.num_rows, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             profile["positive_rate"], time.perf_counter() - started, uri)
    return examples, items


def publish_encoder(layout: RunLayout, result: EncoderResult) -> None:
    """The code tables (<codes>/users.parquet, items.parquet) and the encoder itself (<run dir>/encoder)."""
    users, items = export_codes(result)
    fs, codes_path = storage.filesystem_for(layout.codes, layout.storage)
    write_code_tables(users, items, codes_path, filesystem=fs)
    fs, encoder_path = storage.filesystem_for(layout.encoder, layout.storage)
    save_encoder(result, encoder_path, filesystem=fs)


def read_tuning_inputs(layout: RunLayout, tune: TuneConfig, prompt: PromptConfig):
    """(examples, items, user codes, item codes): codes only when a stage's prompts use them."""
    examples, items = sources.read_examples(layout)
    needs_codes = tune.mode == "two_step" or prompt.kind != "text"
    user_codes, item_codes = sources.read_code_tables(layout) if needs_codes else (None, None)
    return examples, items, user_codes, item_codes


def tune_on_deepspeed(layout: RunLayout, *, tune: TuneConfig, prompt: PromptConfig, llm: LLMConfig,
                      distributed: DistributedConfig, storage_cfg: StorageConfig, seed: int
                      ) -> tuple[TuneResult, DeepSpeedBackend]:
    """A Ray Train worker's tuning: the run's inputs, the precision llm.dtype gives on this device, the DeepSpeed
    backend, the base LLM loaded on its device, tune_lora; the result and the backend (its rank and device)."""
    examples, items, user_codes, item_codes = read_tuning_inputs(layout, tune, prompt)
    precision = llm_precision(llm.dtype, distributed.use_gpu)
    backend = DeepSpeedBackend(distributed, precision=precision)
    model, tokenizer = sources.load_base_model(llm, storage_cfg, device=backend.device,
                                               dtype="bfloat16" if precision == "bf16" else "float32")
    result = tune_lora(examples, items, user_codes, item_codes, tune=tune, prompt=prompt, llm=llm, seed=seed,
                       model=model, tokenizer=tokenizer, backend=backend)
    return result, backend


def publish_adapter(result: TuneResult, uri: str, spec: dict[str, Any], base_model: str,
                    storage_cfg: StorageConfig) -> None:
    """Writes the adapter folder, a tuning summary and the prompt spec it was tuned with (`spec`, see
    binllm.prompt_spec) to `uri`, local or s3://; adapter_config.json goes last, so a reader never loads a
    partly written or partly replaced adapter."""
    summary = {"best_auc": result.best_auc, "answer": dataclasses.asdict(result.answer), "base_model": base_model,
               "stages": [dataclasses.asdict(s) for s in result.stages]}
    with tempfile.TemporaryDirectory() as local:
        save_adapter(result.model, local, state=result.adapter_state)
        Path(local, TUNE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        Path(local, SPEC_FILE).write_text(json.dumps(spec, indent=2))
        storage.upload_dir(local, uri, storage_cfg, last=("adapter_config.json",))


def record_encoder(tracked: JobRun, result: EncoderResult, prefix: str = "encoder") -> None:
    """An encoder's validation AUC per step (<prefix>/valid_auc), its best AUC, steps and epochs."""
    tracked.log_history(prefix, result.history)
    tracked.log_metrics({f"{prefix}/best_auc": result.best_auc, f"{prefix}/steps": result.steps,
                         f"{prefix}/epochs": result.epochs})


def record_tuning(tracked: JobRun, result: TuneResult, layout: RunLayout, model_name: str) -> Any:
    """Each stage's validation curves (<stage>/valid_auc, <stage>/valid_loss per optimizer step), best AUC and
    sizes, the tuning's best AUC, then the published adapter registered (register_adapter); returns the
    registered ModelVersion (None when nothing was registered)."""
    for stage in result.stages:
        tracked.log_history(stage.name, stage.history)
        tracked.log_metrics({f"{stage.name}/{key}": getattr(stage, key) for key in (
            "best_auc", "steps", "epochs", "train_rows", "valid_rows", "train_tokens", "train_seconds")})
    tracked.log_metrics({"best_auc": result.best_auc})
    return register_adapter(tracked, layout, model_name, metadata={"best_auc": result.best_auc})


def register_adapter(tracked: JobRun, layout: RunLayout, model_name: str, metadata: dict | None = None) -> Any:
    """The adapter folder at layout.adapter (PEFT files, tune_result.json, the prompt spec) with the code tables it
    was tuned with (codes/users.parquet and items.parquet, when the run has them) as the run's `adapter`
    artifacts, registered as a new version of `model_name` (binllm.tracking); None when the run is inactive or
    model_name is empty."""
    if not tracked.active or not model_name:
        return None
    with tempfile.TemporaryDirectory(prefix="binllm-register-") as tmp:
        folder = storage.download_dir(layout.adapter, Path(tmp, "adapter"), layout.storage)
        for name in ("users.parquet", "items.parquet"):  # the very bytes whose checksums the prompt spec records
            fs, path = storage.filesystem_for(storage.join_uri(layout.codes, name), layout.storage)
            if fs.get_file_info(path).type == pafs.FileType.File:
                (folder / "codes").mkdir(exist_ok=True)
                pafs.copy_files(path, str(folder / "codes" / name), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
        summary = folder / TUNE_SUMMARY_FILE
        base_model = json.loads(summary.read_text()).get("base_model", "") if summary.is_file() else ""
        info = {"prompt_spec": SPEC_FILE, "codes": "codes", "base_model": base_model, **(metadata or {})}
        return tracked.register_folder(folder, model_name, metadata=info,
                                       tags={"binllm.run_name": Path(layout.run_dir).name})

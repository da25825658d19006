"""The scoring job's inputs: where each one lives, checked before any Ray work starts."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from binllm import sources, storage
from binllm.config import RunLayout, ScoreConfig, StorageConfig
from binllm.data.schema import DataError
from binllm.pipeline.publish import check_dt


class InputError(DataError):
    """A scoring input is missing, or lacks a column it needs."""


@dataclass(frozen=True)
class ScoringInputs:
    interactions: str
    items: str
    user_codes: str
    item_codes: str
    requests: str | None  # explicit (user_id, item_id) pairs; None means candidate generation
    users: str | None  # active users for candidate generation; None means every user with a code
    output: str
    dt: str
    history_before: int  # unix seconds; interactions at or after it are not history


def resolve_inputs(score: ScoreConfig, layout: RunLayout) -> ScoringInputs:
    """The `score` section's inputs and output, defaulting to the run's prepared examples, code tables and
    <run dir>/scores; the date defaults to today (UTC)."""
    examples, codes = layout.examples, layout.codes
    dt = score.dt or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    check_dt(dt)
    if score.history_before:
        cutoff = score.history_before
    else:
        cutoff = int(_dt.datetime.fromisoformat(dt).replace(tzinfo=_dt.timezone.utc).timestamp())
    if score.requests and score.users:
        raise InputError("config keys 'score.requests' and 'score.users': set one (explicit pairs or active users), not both")
    if score.top_k <= 0:
        raise InputError(f"config key 'score.top_k': expected a positive number of candidates, got {score.top_k}")
    return ScoringInputs(
        interactions=score.interactions or storage.join_uri(examples, "examples.parquet"),
        items=score.items or storage.join_uri(examples, "items.parquet"),
        user_codes=storage.join_uri(codes, "users.parquet"),
        item_codes=storage.join_uri(codes, "items.parquet"),
        requests=score.requests or None,
        users=score.users or None,
        output=score.output or storage.join_uri(layout.run_dir, "scores"),
        dt=dt,
        history_before=cutoff,
    )


def parquet_paths(uri: str, what: str, storage_cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, Parquet files) of a file or folder URI; errors name `what` and the URI."""
    fs, path = storage.filesystem_for(uri, storage_cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{what} not found: {uri}")
    if info.type == pafs.FileType.File:
        return fs, [path]
    files = [i.path for i in storage.list_files(uri, storage_cfg) if i.path.endswith(".parquet")]
    if not files:
        raise InputError(f"{what} {uri}: folder holds no .parquet files")
    return fs, files


def _code_bits(schema: pa.Schema, what: str, uri: str) -> int:
    bits = schema.field("bits").type
    if pa.types.is_uint32(bits):
        return 32
    if pa.types.is_fixed_size_binary(bits):
        return 8 * bits.byte_width
    raise InputError(f"{what} {uri}: column 'bits' is {bits}; expected uint32 (32-bit codes) or fixed-size binary")


def check_code_tables(user_uri: str, item_uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Both code tables have id and bits, codes of one length, and one code per id (no empty ids)."""
    lengths = []
    for uri, what in ((user_uri, "user code table"), (item_uri, "item code table")):
        lengths.append(_code_bits(check_schema(uri, what, ["id", "bits"], storage_cfg), what, uri))
        fs, files = parquet_paths(uri, what, storage_cfg)
        ids = pa.chunked_array([pq.read_table(f, columns=["id"], filesystem=fs).column("id") for f in files])
        if ids.null_count:
            raise InputError(f"{what} {uri}: column 'id' has {ids.null_count} empty values; expected an id per code")
        duplicated = len(ids) - pc.count_distinct(ids).as_py()
        if duplicated:
            raise InputError(f"{what} {uri}: column 'id' has {duplicated} duplicated ids; expected one code per id")
    if lengths[0] != lengths[1]:
        raise InputError(f"code tables {user_uri} and {item_uri}: user codes have {lengths[0]} bits, item codes "
                         f"{lengths[1]}; expected one length (both tables from one encoder)")


def _file_names(uri: str, storage_cfg: StorageConfig | None) -> list[str]:
    _, root = storage.filesystem_for(uri, storage_cfg)
    return sorted(i.path[len(root.rstrip("/")) + 1:] for i in storage.list_files(uri, storage_cfg))


def check_model_folders(model_uri: str, adapter_uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """The base model folder (a local path or s3:// prefix; not the demo model, which the job builds itself) has
    config.json and weights, the adapter folder its config and safetensors weights: checked before the model
    is copied to this node and before scoring actors load them."""
    names = _file_names(model_uri, storage_cfg) if model_uri != sources.DEMO_MODEL else ["config.json", "model.safetensors"]
    if not names:
        raise InputError(f"LLM folder not found or empty: {model_uri}")
    if "config.json" not in names:
        raise InputError(f"LLM folder {model_uri}: config.json is missing; expected a Hugging Face model folder "
                         f"(found {names[:10]})")
    if not any(n.endswith((".safetensors", ".bin", ".index.json")) and "/" not in n for n in names):
        raise InputError(f"LLM folder {model_uri}: no model weights; expected *.safetensors or *.bin beside config.json")
    names = _file_names(adapter_uri, storage_cfg)
    for required, why in (("adapter_config.json", "expected a PEFT adapter folder"),
                          ("adapter_model.safetensors", "adapters load from safetensors only")):
        if required not in names:
            raise InputError(f"LoRA adapter {adapter_uri}: {required} is missing (found {names[:10]}); {why}")


def check_schema(uri: str, what: str, required: list[str], storage_cfg: StorageConfig | None = None,
                 one_of: list[str] | None = None) -> pa.Schema:
    """The schema of a Parquet input, with every `required` column and at least one of `one_of` present."""
    fs, files = parquet_paths(uri, what, storage_cfg)
    schema = pq.read_schema(files[0], filesystem=fs)
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise InputError(f"{what} {uri}: missing column(s) {missing}; it has {schema.names}")
    if one_of and not any(c in schema.names for c in one_of):
        raise InputError(f"{what} {uri}: needs one of the columns {one_of}; it has {schema.names}")
    return schema

"""Writing a trained encoder out: code tables (users.parquet / items.parquet) and the encoder itself.

Locations are local folders or URIs (file://, s3://); pass a pyarrow filesystem to reach object storage
with explicit settings, otherwise binllm.storage resolves the URI (s3 settings from the AWS variables).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from binllm.codes import code_table, pack_bits
from binllm.config import EncoderConfig
from binllm.data.schema import DataError
from binllm.encoder.model import BinaryEncoder
from binllm.encoder.train import EncoderResult, build_model
from binllm.storage import filesystem_for

WEIGHTS_FILE = "model.safetensors"
META_FILE = "encoder.json"
USER_VOCAB_FILE = "user_vocab.parquet"
ITEM_VOCAB_FILE = "item_vocab.parquet"
FORMAT_VERSION = 1


def export_codes(result: EncoderResult) -> tuple[pa.Table, pa.Table]:
    """The users' and items' code tables (binllm.codes contract: id, bits, binary, dotted)."""
    if not isinstance(result.model, BinaryEncoder):
        raise TypeError(f"only a binary encoder has codes; this result is kind {result.kind!r}")
    users = code_table(result.user_ids, pack_bits(result.model.codes("user").numpy()))
    items = code_table(result.item_ids, pack_bits(result.model.codes("item").numpy()))
    return users, items


def _resolve(location: str | Path, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); with an explicit filesystem the URI scheme is dropped."""
    location = str(location)
    if filesystem is not None:
        return filesystem, (location.split("://", 1)[1] if "://" in location else location).rstrip("/")
    return filesystem_for(location)


def write_code_tables(users: pa.Table, items: pa.Table, folder_or_uri: str | Path,
                      filesystem: pafs.FileSystem | None = None) -> None:
    """Writes `<folder>/users.parquet` and `<folder>/items.parquet`."""
    fs, root = _resolve(folder_or_uri, filesystem)
    fs.create_dir(root, recursive=True)
    pq.write_table(users, f"{root}/users.parquet", filesystem=fs)
    pq.write_table(items, f"{root}/items.parquet", filesystem=fs)


def read_code_tables(folder_or_uri: str | Path, filesystem: pafs.FileSystem | None = None) -> tuple[pa.Table, pa.Table]:
    """(users, items) code tables written by write_code_tables."""
    fs, root = _resolve(folder_or_uri, filesystem)
    tables = []
    for name in ("users.parquet", "items.parquet"):
        path = f"{root}/{name}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"code table not found: {folder_or_uri}/{name}")
        tables.append(pq.read_table(path, filesystem=fs))
    return tables[0], tables[1]


def save_encoder(result: EncoderResult, folder: str | Path, filesystem: pafs.FileSystem | None = None) -> None:
    """Writes model.safetensors (state dict), encoder.json (kind, sizes, config, training summary) and the
    vocabularies user_vocab.parquet / item_vocab.parquet (column id; row k = embedding row k)."""
    fs, root = _resolve(folder, filesystem)
    fs.create_dir(root, recursive=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in result.model.state_dict().items()}
    with fs.open_output_stream(f"{root}/{WEIGHTS_FILE}") as out:
        out.write(save_safetensors(state))
    for name, ids in ((USER_VOCAB_FILE, result.user_ids), (ITEM_VOCAB_FILE, result.item_ids)):
        pq.write_table(pa.table({"id": pa.array(list(ids), type=pa.string())}), f"{root}/{name}", filesystem=fs)
    meta = {
        "format_version": FORMAT_VERSION, "kind": result.kind,
        "n_users": len(result.user_ids), "n_items": len(result.item_ids),
        "config": asdict(result.config), "best_auc": result.best_auc, "steps": result.steps,
        "epochs": result.epochs, "stopped_early": result.stopped_early, "history": result.history,
    }
    # META_FILE goes last: a folder with it is complete.
    with fs.open_output_stream(f"{root}/{META_FILE}") as out:
        out.write(json.dumps(meta, indent=2).encode())


def load_encoder(folder: str | Path, filesystem: pafs.FileSystem | None = None) -> EncoderResult:
    """The EncoderResult written by save_encoder (model on CPU, in eval mode)."""
    fs, root = _resolve(folder, filesystem)
    meta_path = f"{root}/{META_FILE}"
    if fs.get_file_info(meta_path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no saved encoder at {folder}: {META_FILE} is missing")
    with fs.open_input_stream(meta_path) as f:
        meta = json.loads(f.read())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{folder}/{META_FILE}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    cfg = EncoderConfig(**meta["config"])
    ids = {}
    for name in (USER_VOCAB_FILE, ITEM_VOCAB_FILE):
        table = pq.read_table(f"{root}/{name}", filesystem=fs)
        if "id" not in table.column_names:
            raise DataError(f"{folder}/{name}: missing column 'id'")
        ids[name] = np.asarray(table.column("id").to_pylist(), dtype=object)
    if (len(ids[USER_VOCAB_FILE]), len(ids[ITEM_VOCAB_FILE])) != (meta["n_users"], meta["n_items"]):
        raise DataError(f"{folder}: vocabulary sizes do not match {META_FILE} (n_users, n_items)")
    model = build_model(meta["kind"], meta["n_users"], meta["n_items"], cfg)
    with fs.open_input_stream(f"{root}/{WEIGHTS_FILE}") as f:
        model.load_state_dict(load_safetensors(f.read()))
    model.eval()
    return EncoderResult(
        model=model, user_ids=ids[USER_VOCAB_FILE], item_ids=ids[ITEM_VOCAB_FILE], best_auc=meta["best_auc"],
        history=meta["history"], steps=meta["steps"], epochs=meta["epochs"], stopped_early=meta["stopped_early"],
        kind=meta["kind"], config=cfg,
    )

"""Where data lives: plain paths, file:// and s3:// URIs behind one pyarrow filesystem, and the publish
protocol that makes a run's outputs visible all at once.

S3 settings come from `StorageConfig` when set, else from the standard AWS variables
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN). They are resolved once, in the process that builds the
filesystem, and travel with it when Ray pickles it to workers on other nodes.

Published layout (see docs/pipeline_benchmark.md, "Output layout and readers"):

    <root>/dt=2026-11-26/run=<run_id>/part-*.parquet   data of one run, written first
    <root>/dt=2026-11-26/run=<run_id>/_manifest.json   that run's manifest
    <root>/dt=2026-11-26/_manifest.json                the pointer: a copy of the live run's manifest,
                                                       written last (one atomic PUT / rename)

Readers that follow the pointer (`read_partition`, or the file list in `_manifest.json`) see the old
complete run or the new one, never a mix. Runs other than the live one are deleted after the pointer
flips, so a plain hive reader of <root> sees exactly one run per date except while a publish is in
progress or after a run crashed before publishing; the `run` hive column tells such a reader which
rows belong to the live run.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from binllm.cache import default_cache_dir, file_lock
from binllm.config import StorageConfig

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "binllm-manifest/1"
CACHE_MARKER = ".binllm-download.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DT = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class StorageError(RuntimeError):
    """A path is missing, malformed, or its contents are not what was expected."""


# ---------------------------------------------------------------------------------------------------------
# URIs and filesystems


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def join_uri(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for local paths and URIs alike (no os.sep surprises for s3://)."""
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def _setting(configured: str | None, *env_names: str) -> str | None:
    if configured:
        return configured
    for name in env_names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def resolve_s3_settings(storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """endpoint_url, region, access_key_id, secret_access_key, session_token, anon: the configured value, else
    the AWS variable of this process. Jobs resolve them once in the driver and hand them to workers, whose
    environment may lack the variables."""
    cfg = storage_cfg or StorageConfig()
    return {
        "endpoint_url": _setting(cfg.endpoint_url, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        "region": _setting(cfg.region, "AWS_REGION", "AWS_DEFAULT_REGION"),
        "access_key_id": _setting(cfg.access_key_id, "AWS_ACCESS_KEY_ID"),
        "secret_access_key": _setting(cfg.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
        "session_token": cfg.session_token or (None if cfg.access_key_id else os.environ.get("AWS_SESSION_TOKEN")),
        "anon": bool(cfg.anon),
    }


def s3_filesystem(storage_cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem with endpoint, region and credentials from `storage_cfg` or the AWS variables."""
    s = resolve_s3_settings(storage_cfg)
    kwargs: dict[str, Any] = {"region": s["region"] or "us-east-1", "anonymous": s["anon"]}
    if s["endpoint_url"]:
        endpoint = s["endpoint_url"]
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"S3 endpoint {endpoint!r} (storage.endpoint_url or AWS_ENDPOINT_URL): expected an "
                               "http:// or https:// URL, e.g. https://s3.example.com:9000")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    if s["access_key_id"] and s["secret_access_key"] and not s["anon"]:
        kwargs.update(access_key=s["access_key_id"], secret_key=s["secret_access_key"],
                      session_token=s["session_token"])
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str | os.PathLike, storage_cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a plain path, a file:// URI or an s3://bucket/key URI."""
    text = str(uri)
    if not text:
        raise StorageError("empty path: expected a local path, file:// or s3:// URI")
    if is_s3(text):
        path = text[len("s3://"):].strip("/")
        if not path:
            raise StorageError(f"{text!r}: an s3:// URI needs a bucket, e.g. s3://bucket/prefix")
        return s3_filesystem(storage_cfg), path
    if text.startswith("file://"):
        text = urlparse(text).path
    elif "://" in text:
        raise StorageError(f"{text!r}: unsupported URI scheme; expected a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


def file_info(uri: str, storage_cfg: StorageConfig | None = None) -> pafs.FileInfo:
    fs, path = filesystem_for(uri, storage_cfg)
    return fs.get_file_info(path)


def exists(uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    return file_info(uri, storage_cfg).type != pafs.FileType.NotFound


def require_exists(uri: str, what: str, storage_cfg: StorageConfig | None = None) -> pafs.FileInfo:
    info = file_info(uri, storage_cfg)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} not found: {uri}")
    return info


def list_files(uri: str, storage_cfg: StorageConfig | None = None, suffix: str | None = None) -> list[pafs.FileInfo]:
    """Every file below the folder `uri` (recursive), sorted by path; names starting with '.' or '_' skipped
    unless `suffix` asks for them explicitly."""
    fs, path = filesystem_for(uri, storage_cfg)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path):].lstrip("/")
        if suffix is None and any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if suffix is not None and not info.path.endswith(suffix):
            continue
        out.append(info)
    return sorted(out, key=lambda i: i.path)


def delete_dir(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem_for(uri, storage_cfg)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


# ---------------------------------------------------------------------------------------------------------
# Parquet and JSON


def read_table(uri: str, storage_cfg: StorageConfig | None = None, columns: list[str] | None = None, what: str = "table") -> pa.Table:
    """One Parquet file, or every Parquet file under a folder, as one table. Missing columns raise naming them."""
    fs, path = filesystem_for(uri, storage_cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} not found: {uri}")
    if info.type == pafs.FileType.Directory:
        files = [i.path for i in list_files(uri, storage_cfg) if i.path.endswith(".parquet")]
        if not files:
            raise StorageError(f"{what} {uri}: folder holds no .parquet files")
    else:
        files = [path]
    dataset = pq.ParquetDataset(files, filesystem=fs)
    if columns is not None:
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise StorageError(f"{what} {uri}: missing column(s) {missing}; it has {dataset.schema.names}")
    return dataset.read(columns=columns)


def write_table(table: pa.Table, uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """One Parquet file at `uri`, parent folders created."""
    fs, path = filesystem_for(uri, storage_cfg)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def write_bytes(data: bytes, uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """One file at `uri` (a report, a plot, a safetensors blob), parent folders created."""
    fs, path = filesystem_for(uri, storage_cfg)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_json(uri: str, storage_cfg: StorageConfig | None = None) -> Any:
    fs, path = filesystem_for(uri, storage_cfg)
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except FileNotFoundError as exc:
        raise StorageError(f"JSON file not found: {uri}") from exc
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri} is not valid JSON: {exc}") from exc


def write_json(obj: Any, uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Writes `obj` as JSON so that a reader sees the old file or the new one: a single PUT on S3, a write
    to a temporary name and a rename on a local disk."""
    fs, path = filesystem_for(uri, storage_cfg)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


# ---------------------------------------------------------------------------------------------------------
# Folders (models, adapters)


def _listing(uri: str, storage_cfg: StorageConfig | None) -> tuple[pafs.FileSystem, str, list[tuple[str, int, str]]]:
    """(fs, root path, [(relative path, size, mtime)]) for every file under a folder, hidden files included."""
    fs, root = filesystem_for(uri, storage_cfg)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise StorageError(f"folder not found: {uri}")
    entries = []
    for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if item.type == pafs.FileType.File:
            rel = item.path[len(root):].lstrip("/")
            entries.append((rel, int(item.size), item.mtime.isoformat() if item.mtime else ""))
    if not entries:
        raise StorageError(f"folder is empty: {uri}")
    return fs, root, sorted(entries)


def upload_dir(local_dir: str | os.PathLike, uri: str, storage_cfg: StorageConfig | None = None, last: tuple[str, ...] = ()) -> int:
    """Copies every file of a local folder to `uri` (local or s3://); returns the number of files.

    Files named in `last` (relative paths) are removed from the destination first and copied after all
    others: when they are what makes a folder usable (a PEFT adapter's adapter_config.json, say), a
    reader never loads a half-copied or half-replaced folder.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"folder not found: {local_dir}")
    fs, root = filesystem_for(uri, storage_cfg)
    for name in last:
        if fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File:
            fs.delete_file(f"{root}/{name}")
    files = sorted((p for p in local_dir.rglob("*") if p.is_file()),
                   key=lambda p: (p.relative_to(local_dir).as_posix() in last, p.as_posix()))
    for file in files:
        dest = f"{root}/{file.relative_to(local_dir).as_posix()}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(file), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return len(files)


def download_dir(uri: str, local_dir: str | os.PathLike, storage_cfg: StorageConfig | None = None) -> Path:
    """Copies the folder `uri` to `local_dir` and checks every file's size against the source listing.

    The copy is assembled in a sibling temporary folder and renamed into place, so `local_dir` either
    does not exist or is complete. An existing `local_dir` is replaced.
    """
    fs, root, entries = _listing(uri, storage_cfg)
    local_dir = Path(local_dir)
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", dir=local_dir.parent))
    try:
        for rel, size, _ in entries:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{root}/{rel}", str(dest), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            got = dest.stat().st_size
            if got != size:
                raise StorageError(f"download of {uri}/{rel}: got {got} bytes, the source lists {size}")
        if local_dir.exists():
            shutil.rmtree(local_dir)
        tmp.rename(local_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return local_dir


def default_download_cache() -> Path:
    return default_cache_dir() / "downloads"


def local_copy(uri: str, cache_dir: str | os.PathLike | None = None, storage_cfg: StorageConfig | None = None) -> Path:
    """A local folder holding the folder `uri`: the folder itself when local, else a copy in the node's cache.

    Processes on one node share the copy (a file lock serialises the download); the copy is reused while
    the source listing (names, sizes, modification times) is unchanged and fetched again when it changes.
    """
    if not is_s3(uri):
        fs, path = filesystem_for(uri, storage_cfg)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise StorageError(f"folder not found: {uri}")
        return Path(path)
    _, _, entries = _listing(uri, storage_cfg)
    cache = Path(cache_dir) if cache_dir else default_download_cache()
    local = cache / hashlib.sha256(uri.encode()).hexdigest()[:24]
    fingerprint = {"uri": uri, "files": [list(e) for e in entries]}
    with file_lock(cache / f"{local.name}.lock"):
        marker = local / CACHE_MARKER
        if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
            return local
        logger.info("downloading %s into %s", uri, local)
        download_dir(uri, local, storage_cfg)
        marker.write_text(json.dumps(fingerprint))
    return local


def dir_checksum(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """sha256 over every file's relative path and contents (cache markers excluded), streamed."""
    fs, root, entries = _listing(uri, storage_cfg)
    digest = hashlib.sha256()
    for rel, _, _ in entries:
        if rel == CACHE_MARKER:
            continue
        digest.update(rel.encode() + b"\0")
        with fs.open_input_stream(f"{root}/{rel}") as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Publishing a dated partition


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise StorageError(f"run id {run_id!r}: expected letters, digits, '.', '_' or '-' (no '/' or '=')")
    return run_id


def check_dt(dt: str) -> str:
    if not _DT.match(dt):
        raise StorageError(f"partition date {dt!r}: expected YYYY-MM-DD")
    try:
        _dt.date.fromisoformat(dt)
    except ValueError as exc:
        raise StorageError(f"partition date {dt!r}: not a calendar date ({exc})") from None
    return dt


def partition_uri(root: str, dt: str) -> str:
    return join_uri(root, f"dt={check_dt(dt)}")


def run_uri(root: str, dt: str, run_id: str) -> str:
    """Where a run writes its data before it is published (a fresh prefix: one run id, one attempt)."""
    return join_uri(partition_uri(root, dt), f"run={check_run_id(run_id)}")


@dataclass(frozen=True)
class PublishedFile:
    path: str  # relative to the output root
    rows: int
    bytes: int


def _data_files(root: str, dt: str, run_id: str, storage_cfg: StorageConfig | None) -> list[PublishedFile]:
    fs, root_path = filesystem_for(root, storage_cfg)
    out = []
    for info in list_files(run_uri(root, dt, run_id), storage_cfg):
        if not info.path.endswith(".parquet"):
            continue
        rows = pq.ParquetFile(info.path, filesystem=fs).metadata.num_rows
        out.append(PublishedFile(info.path[len(root_path):].lstrip("/"), rows, int(info.size)))
    return out


def publish_partition(root: str, dt: str, run_id: str, fields: dict[str, Any], storage_cfg: StorageConfig | None = None) -> dict:
    """Makes the run `run_id` the live contents of `<root>/dt=<dt>/` and deletes the date's other runs.

    The run's Parquet files must already be under `run_uri(root, dt, run_id)`. The manifest lists every
    file with its row count and byte size, plus `fields` (inputs, checksums, config, code version). It is
    written into the run folder, then copied to the date's pointer `_manifest.json` (the commit point).
    Only one writer per date at a time is supported: the pointer is re-read before cleanup, and a run that
    lost the pointer to another leaves everything in place.
    """
    files = _data_files(root, dt, run_id, storage_cfg)
    manifest = {
        **fields,
        "format": MANIFEST_FORMAT,
        "dt": dt,
        "run_id": run_id,
        "data_dir": f"dt={dt}/run={run_id}",
        "files": [vars(f) for f in files],
        "rows": sum(f.rows for f in files),
        "published_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(manifest, join_uri(run_uri(root, dt, run_id), MANIFEST_NAME), storage_cfg)
    # Files must still be there: a concurrent writer's cleanup may have removed them.
    if _data_files(root, dt, run_id, storage_cfg) != files:
        raise StorageError(f"run {run_id} under {partition_uri(root, dt)} changed while publishing; not published")
    pointer = join_uri(partition_uri(root, dt), MANIFEST_NAME)
    write_json(manifest, pointer, storage_cfg)
    if read_json(pointer, storage_cfg).get("run_id") == run_id:
        _delete_other_runs(root, dt, run_id, storage_cfg)
    return manifest


def _delete_other_runs(root: str, dt: str, live_run: str, storage_cfg: StorageConfig | None) -> None:
    fs, part = filesystem_for(partition_uri(root, dt), storage_cfg)
    for info in fs.get_file_info(pafs.FileSelector(part, recursive=False)):
        name = info.path.rsplit("/", 1)[1]
        if info.type == pafs.FileType.Directory and name.startswith("run=") and name != f"run={live_run}":
            logger.info("deleting superseded run %s", info.path)
            fs.delete_dir(info.path)


def read_manifest(root: str, dt: str, storage_cfg: StorageConfig | None = None) -> dict | None:
    """The live manifest of a date, or None when nothing was published for it."""
    pointer = join_uri(partition_uri(root, dt), MANIFEST_NAME)
    if not exists(pointer, storage_cfg):
        return None
    manifest = read_json(pointer, storage_cfg)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StorageError(f"{pointer}: expected format {MANIFEST_FORMAT!r}, got {manifest.get('format')!r}")
    return manifest


def published_dates(root: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    fs, path = filesystem_for(root, storage_cfg)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[1]
        if info.type == pafs.FileType.Directory and name.startswith("dt="):
            if exists(join_uri(root, name, MANIFEST_NAME), storage_cfg):
                out.append(name[3:])
    return sorted(out)


def read_partition(root: str, dt: str, storage_cfg: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """The live run of a date, read through its manifest (exactly the files it names)."""
    manifest = read_manifest(root, dt, storage_cfg)
    if manifest is None:
        raise StorageError(f"nothing published under {partition_uri(root, dt)} (no {MANIFEST_NAME})")
    fs, root_path = filesystem_for(root, storage_cfg)
    paths = [f"{root_path}/{f['path']}" for f in manifest["files"]]
    if not paths:
        raise StorageError(f"{partition_uri(root, dt)}: the live run {manifest['run_id']} has no data files")
    table = pq.ParquetDataset(paths, filesystem=fs).read(columns=columns)
    if table.num_rows != manifest["rows"]:
        raise StorageError(
            f"{partition_uri(root, dt)}: read {table.num_rows} rows, the manifest lists {manifest['rows']}"
        )
    return table

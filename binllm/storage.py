"""Where data lives: plain paths, file:// and s3:// URIs behind one pyarrow filesystem; Parquet, JSON and
whole folders read and written through it, with retries.

S3 endpoint and region come from `StorageConfig` when set, else from the standard AWS variables
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION). Credentials come only from the
standard AWS mechanisms, never from a config file: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, else the AWS SDK's own chain (profile, instance or pod role). The scoring job resolves
them once in its driver (`with_credentials`) and hands the result to its Ray workers, whose environment
may lack the variables; every other filesystem leaves them to the SDK's chain of the process using it (the
training jobs' workers included), so none carries them into a pickle. They are never written to an
output, a manifest, a Ray Train run folder or a log. Every S3 request is retried up to
`storage.max_attempts` times (AWS standard retry strategy: 5xx, SlowDown, dropped connections), also in
workers (the filesystem keeps its retry strategy when Ray pickles it).

The publish protocol that makes a scoring run's outputs visible all at once is binllm.pipeline.publish.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from binllm.cache import default_cache_dir, file_lock
from binllm.config import StorageConfig

logger = logging.getLogger(__name__)

CACHE_MARKER = ".binllm-download.json"


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


@dataclass
class S3Settings(StorageConfig):
    """StorageConfig plus the credentials of the standard AWS variables of the process that built it (the
    driver). Travels to Ray workers inside the job's configuration; never printed (repr) nor recorded:
    manifests record the job's configuration, which cannot hold credentials."""

    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def with_credentials(storage_cfg: StorageConfig | None = None) -> S3Settings:
    """`storage_cfg` with endpoint and region resolved (config, else AWS variables) and the credentials of
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (None: workers use the SDK's chain)."""
    cfg = storage_cfg or StorageConfig()
    if isinstance(cfg, S3Settings):
        return cfg
    s = resolve_s3_settings(cfg)
    return S3Settings(**{f.name: getattr(cfg, f.name) for f in fields(StorageConfig)}
                      | {k: s[k] for k in ("endpoint_url", "region", "access_key_id", "secret_access_key",
                                           "session_token")})


def resolve_s3_settings(storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """endpoint_url, region (the configured value, else the AWS variable), access_key_id, secret_access_key,
    session_token (carried by `S3Settings`, else the AWS variables of this process), anon, max_attempts."""
    cfg = storage_cfg or StorageConfig()
    if isinstance(cfg, S3Settings):
        creds = (cfg.access_key_id, cfg.secret_access_key, cfg.session_token)
    else:
        creds = (os.environ.get("AWS_ACCESS_KEY_ID") or None, os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
                 os.environ.get("AWS_SESSION_TOKEN") or None)
    return {
        "endpoint_url": _setting(cfg.endpoint_url, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        "region": _setting(cfg.region, "AWS_REGION", "AWS_DEFAULT_REGION"),
        "access_key_id": creds[0],
        "secret_access_key": creds[1],
        "session_token": creds[2],
        "anon": bool(cfg.anon),
        "max_attempts": cfg.max_attempts,
    }


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with a retry strategy that survives pickling (the plain one is rebuilt with
    the default 3 attempts in Ray workers)."""

    def __init__(self, kwargs: dict[str, Any], max_attempts: int):
        super().__init__(**kwargs, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts))
        self._kwargs, self._max_attempts = kwargs, max_attempts

    def __reduce__(self):
        return RetryingS3FileSystem, (self._kwargs, self._max_attempts)

    def __repr__(self) -> str:
        return f"RetryingS3FileSystem(endpoint={self._kwargs.get('endpoint_override')!r}, max_attempts={self._max_attempts})"


def s3_filesystem(storage_cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem: endpoint and region from `storage_cfg` or the AWS variables, credentials
    carried by an `S3Settings`, else found by the AWS SDK's own chain (AWS variables, profile, instance
    role) in whichever process uses it; `storage_cfg.max_attempts` attempts per request."""
    s = resolve_s3_settings(storage_cfg)
    if s["max_attempts"] < 1:
        raise StorageError(f"config key 'storage.max_attempts': expected >= 1, got {s['max_attempts']}")
    kwargs: dict[str, Any] = {"region": s["region"] or "us-east-1", "anonymous": s["anon"]}
    if s["endpoint_url"]:
        endpoint = s["endpoint_url"]
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"S3 endpoint {endpoint!r} (storage.endpoint_url or AWS_ENDPOINT_URL): expected an "
                               "http:// or https:// URL, e.g. https://s3.example.com:9000")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    # Only carried credentials go into the filesystem: it pickles them, and Ray Train writes its storage
    # filesystem into the run folder (trainer.pkl). Otherwise the AWS SDK's chain finds them in each process.
    if isinstance(storage_cfg, S3Settings) and s["access_key_id"] and s["secret_access_key"] and not s["anon"]:
        kwargs.update(access_key=s["access_key_id"], secret_key=s["secret_access_key"],
                      session_token=s["session_token"])
    return RetryingS3FileSystem(kwargs, s["max_attempts"])


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


def _retrying(fs: pafs.FileSystem, attempts: int, action, *args):
    """`action(*args)`, retried on S3 I/O errors. pyarrow's S3 reads land an error answer's body in the
    caller's buffer; when the object is smaller than that body (a 503 SlowDown's XML is ~200 bytes) the
    SDK gives up without retrying ("Failed to flush response stream"), so whole-file reads retry here."""
    for attempt in range(1, attempts + 1):
        try:
            return action(*args)
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == attempts or isinstance(fs, pafs.LocalFileSystem):
                raise
            time.sleep(min(0.05 * 2 ** attempt, 2.0))
    raise AssertionError("unreachable")


def _attempts(storage_cfg: StorageConfig | None) -> int:
    return (storage_cfg or StorageConfig()).max_attempts


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_json(uri: str, storage_cfg: StorageConfig | None = None) -> Any:
    fs, path = filesystem_for(uri, storage_cfg)
    try:
        data = _retrying(fs, _attempts(storage_cfg), _read_bytes, fs, path)
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
            _retrying(fs, _attempts(storage_cfg), lambda: pafs.copy_files(
                f"{root}/{rel}", str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()))
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
        digest = _retrying(fs, _attempts(storage_cfg), _digest_file, digest, fs, f"{root}/{rel}")
    return digest.hexdigest()


def file_checksum(uri: str, what: str, storage_cfg: StorageConfig | None = None) -> str:
    """sha256 of one file's contents, streamed (StorageError naming `what` when it is missing)."""
    require_exists(uri, what, storage_cfg)
    fs, path = filesystem_for(uri, storage_cfg)
    return _retrying(fs, _attempts(storage_cfg), _digest_file, hashlib.sha256(), fs, path).hexdigest()


def _digest_file(digest, fs: pafs.FileSystem, path: str):
    """A copy of `digest` updated with the file's contents (the original stays as it was for a retry)."""
    digest = digest.copy()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest

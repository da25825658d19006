"""Publishing a scoring run's dated partition: a run's outputs become visible all at once, and readers
that follow the date's manifest see one complete run, never a mix.

Public API (all paths are local paths, file:// or s3:// URIs; `storage_cfg` reaches them):

    check_run_id(run_id), check_dt(dt)                   validate a run id / a YYYY-MM-DD date
    partition_uri(root, dt), run_uri(root, dt, run_id)   where a date's partition / a run's data live
    start_run(root, dt, run_id)                          the run's marker, before any of its data
    publish_partition(root, dt, run_id, fields)          the run's manifest, then the date's pointer flip
    remove_stale_runs(root, max_age_hours)               leftovers of killed runs, any date
    read_manifest(root, dt), published_dates(root)       what is live
    previous_published_date(root, dt)                    the newest published date before dt (the health report's)
    record_partition(root, dt, run_id, fields, rows)     a run whose rows live elsewhere (the Iceberg sink): its
                                                         manifest and the pointer, no protocol (last writer wins)
    read_partition(root, dt, columns=None)               the live run's rows, through its manifest
    RunSuperseded, PublishedFile, MANIFEST_NAME, RUN_MARKER, MANIFEST_FORMAT

Published layout (see docs/pipeline_benchmark.md, "Output layout and readers"):

    <root>/dt=2026-11-26/run=<run_id>/part-*.parquet   data of one run, written first
    <root>/dt=2026-11-26/run=<run_id>/_manifest.json   that run's manifest
    <root>/dt=2026-11-26/_manifest.json                the pointer: a copy of the live run's manifest,
                                                       written last (one atomic PUT / rename)

    <root>/dt=2026-11-26/run=<run_id>/_run.json        the run's marker: started_at and state
                                                       (running | published), written before any data
    <root>/dt=2026-11-26/run=<run_id>/_health.png      the run's score histogram over the previous date's
                                                       (binllm.pipeline.health; named in the manifest)

Readers that follow the pointer (`read_partition`, or the file list in `_manifest.json`) see the old
complete run or the new one, never a mix. Runs other than the live one are deleted after the pointer
flips, so a plain hive reader of <root> sees exactly one run per date except while a publish is in
progress or after a run crashed before publishing; the `run` hive column tells such a reader which
rows belong to the live run.

Several runs of one date at once (no lock is needed, and S3 has no compare-and-swap in pyarrow):
the run that STARTED last wins, whatever the order they finish in. A publisher writes its run
manifest, then makes the pointer name the newest run that has a run manifest and re-lists until the
pointer and the listing agree. A run that finds a newer one removes its own folder and raises
`RunSuperseded` (its job fails with that message); a run that had already published is superseded by
the newer one when that one publishes. A winner deletes older runs of its date only once they are
finished (marker state `published`, or an older layout without a marker): an older run that is still
publishing is never deleted under it, it removes itself when it sees the newer run. With two
concurrent writers the pointer always names a complete run; with three or more, a reader may for a
moment find the pointer naming a run that is being removed, and then fails on the missing file
rather than reading a mix.

Leftover runs (a job killed after writing data, before publishing) are removed by the next run of any
date under the same root (`remove_stale_runs`): a `run=` folder that is not its date's live run and
whose marker says it started more than `score.stale_run_hours` ago (no marker: its newest file is that
old). A concurrently running job's folder is younger than that, as long as `score.stale_run_hours`
exceeds the longest run.
"""
from __future__ import annotations

import datetime as _dt
import logging
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from binllm import storage
from binllm.config import StorageConfig
from binllm.storage import StorageError

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "RUN_MARKER", "PublishedFile", "RunSuperseded", "check_dt",
           "check_run_id", "partition_uri", "previous_published_date", "publish_partition", "published_dates",
           "read_manifest", "read_partition", "record_partition", "remove_stale_runs", "run_uri", "start_run"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
RUN_MARKER = "_run.json"
MANIFEST_FORMAT = "binllm-manifest/1"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DT = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class RunSuperseded(StorageError):
    """A run of a date lost to a run of the same date that started after it (see the module docstring)."""


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
    return storage.join_uri(root, f"dt={check_dt(dt)}")


def run_uri(root: str, dt: str, run_id: str) -> str:
    """Where a run writes its data before it is published (a fresh prefix: one run id, one attempt)."""
    return storage.join_uri(partition_uri(root, dt), f"run={check_run_id(run_id)}")


@dataclass(frozen=True)
class PublishedFile:
    path: str  # relative to the output root
    rows: int
    bytes: int


def _data_files(root: str, dt: str, run_id: str, storage_cfg: StorageConfig | None) -> list[PublishedFile]:
    fs, root_path = storage.filesystem_for(root, storage_cfg)
    out = []
    for info in storage.list_files(run_uri(root, dt, run_id), storage_cfg):
        if not info.path.endswith(".parquet"):
            continue
        rows = pq.ParquetFile(info.path, filesystem=fs).metadata.num_rows
        out.append(PublishedFile(info.path[len(root_path):].lstrip("/"), rows, int(info.size)))
    return out


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def start_run(root: str, dt: str, run_id: str, storage_cfg: StorageConfig | None = None) -> str:
    """Writes the run's marker (state `running`, started_at) before any of its data; returns started_at."""
    started_at = _now().isoformat(timespec="microseconds")
    storage.write_json({"run_id": run_id, "started_at": started_at, "state": "running"},
                       storage.join_uri(run_uri(root, dt, run_id), RUN_MARKER), storage_cfg)
    return started_at


def _read_json_or_none(uri: str, storage_cfg: StorageConfig | None) -> Any:
    try:
        return storage.read_json(uri, storage_cfg)
    except StorageError:  # missing (deleted meanwhile) or half-deleted: treated as absent
        return None


def _run_folders(root: str, dt: str, storage_cfg: StorageConfig | None) -> list[str]:
    """Run ids with a folder under the date."""
    fs, part = storage.filesystem_for(partition_uri(root, dt), storage_cfg)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(part, recursive=False, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[1]
        if info.type == pafs.FileType.Directory and name.startswith("run="):
            out.append(name[len("run="):])
    return sorted(out)


def _order(manifest: dict) -> tuple[str, str]:
    return manifest.get("started_at", ""), manifest["run_id"]


def _newest_complete_run(root: str, dt: str, storage_cfg: StorageConfig | None) -> dict | None:
    """The run manifest of the date's run that started last among those that wrote one."""
    manifests = []
    for run_id in _run_folders(root, dt, storage_cfg):
        manifest = _read_json_or_none(storage.join_uri(run_uri(root, dt, run_id), MANIFEST_NAME), storage_cfg)
        if isinstance(manifest, dict) and manifest.get("run_id") == run_id and manifest.get("format") == MANIFEST_FORMAT:
            manifests.append(manifest)
    return max(manifests, key=_order, default=None)


def _point_to_newest(root: str, dt: str, storage_cfg: StorageConfig | None, attempts: int = 20) -> dict:
    """Writes the pointer until it names the newest complete run of the date and a re-listing agrees."""
    pointer = storage.join_uri(partition_uri(root, dt), MANIFEST_NAME)
    for _ in range(attempts):
        newest = _newest_complete_run(root, dt, storage_cfg)
        if newest is None:
            raise StorageError(f"{partition_uri(root, dt)}: no run manifest found while publishing")
        current = _read_json_or_none(pointer, storage_cfg)
        if isinstance(current, dict) and current.get("run_id") == newest["run_id"]:
            return newest
        storage.write_json(newest, pointer, storage_cfg)
    raise StorageError(f"{pointer}: the pointer kept changing under {attempts} concurrent publishes; not published")


def publish_partition(root: str, dt: str, run_id: str, fields: dict[str, Any], storage_cfg: StorageConfig | None = None) -> dict:
    """Makes the run `run_id` the live contents of `<root>/dt=<dt>/` and deletes the date's other runs.

    The run's Parquet files must already be under `run_uri(root, dt, run_id)`. The manifest lists every
    file with its row count and byte size, plus `fields` (inputs, checksums, config, code version). It is
    written into the run folder, then copied to the date's pointer `_manifest.json` (the commit point).
    Concurrent runs of a date: the one that started last wins (module docstring); a run that loses
    removes its folder and raises `RunSuperseded`.
    """
    run_dir = run_uri(root, dt, run_id)
    marker = _read_json_or_none(storage.join_uri(run_dir, RUN_MARKER), storage_cfg)
    started_at = marker["started_at"] if isinstance(marker, dict) and "started_at" in marker \
        else _now().isoformat(timespec="microseconds")
    files = _data_files(root, dt, run_id, storage_cfg)
    manifest = {
        **fields,
        "format": MANIFEST_FORMAT,
        "dt": dt,
        "run_id": run_id,
        "data_dir": f"dt={dt}/run={run_id}",
        "files": [vars(f) for f in files],
        "rows": sum(f.rows for f in files),
        "started_at": started_at,
        "published_at": _now().isoformat(timespec="seconds"),
    }
    storage.write_json(manifest, storage.join_uri(run_dir, MANIFEST_NAME), storage_cfg)
    # Files must still be there: a newer run's cleanup may have removed them.
    if _data_files(root, dt, run_id, storage_cfg) != files:
        _superseded(root, dt, run_id, storage_cfg, "its files changed while publishing")
    while True:
        live = _point_to_newest(root, dt, storage_cfg)
        if live["run_id"] != run_id:
            _superseded(root, dt, run_id, storage_cfg, f"the run {live['run_id']} started after it and was published")
        storage.write_json({"run_id": run_id, "started_at": started_at, "state": "published"},
                           storage.join_uri(run_dir, RUN_MARKER), storage_cfg)
        newest = _newest_complete_run(root, dt, storage_cfg)
        if newest is not None and newest["run_id"] == run_id:
            break  # a newer run that appears from here on finds this one finished and supersedes it
    _delete_finished_older_runs(root, dt, manifest, storage_cfg)
    return manifest


def _superseded(root: str, dt: str, run_id: str, storage_cfg: StorageConfig | None, why: str):
    _delete_run(root, dt, run_id, storage_cfg)
    raise RunSuperseded(f"run {run_id} of {partition_uri(root, dt)} not published: {why}; "
                        "its folder was removed and the date's published result is the newer run's")


def _delete_run(root: str, dt: str, run_id: str, storage_cfg: StorageConfig | None) -> None:
    """The run manifest first, so that a half-deleted run is never taken for a complete one."""
    fs, path = storage.filesystem_for(run_uri(root, dt, run_id), storage_cfg)
    try:
        fs.delete_file(f"{path}/{MANIFEST_NAME}")
    except (FileNotFoundError, OSError):
        pass
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass  # already gone, or being removed by a concurrent run


def _run_age_start(root: str, dt: str, run_id: str, storage_cfg: StorageConfig | None) -> tuple[str | None, _dt.datetime | None]:
    """(state, started) from the run's marker; without one (older layout): (None, newest file's mtime)."""
    marker = _read_json_or_none(storage.join_uri(run_uri(root, dt, run_id), RUN_MARKER), storage_cfg)
    if isinstance(marker, dict) and "started_at" in marker:
        return marker.get("state"), _dt.datetime.fromisoformat(marker["started_at"])
    fs, path = storage.filesystem_for(run_uri(root, dt, run_id), storage_cfg)
    entries = [fs.get_file_info(path), *fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))]
    times = [i.mtime for i in entries if i.mtime is not None]
    newest = max(times, default=None)
    return None, newest.astimezone(_dt.timezone.utc) if newest is not None else None


def _delete_finished_older_runs(root: str, dt: str, live: dict, storage_cfg: StorageConfig | None) -> None:
    """Runs of the date that started before the live one and are finished (published, or an older layout);
    an older run still publishing is left alone and removes itself when it sees the live one."""
    live_start = _dt.datetime.fromisoformat(live["started_at"])
    for run_id in _run_folders(root, dt, storage_cfg):
        if run_id == live["run_id"]:
            continue
        state, started = _run_age_start(root, dt, run_id, storage_cfg)
        if started is None or (started, run_id) < (live_start, live["run_id"]) and state != "running":
            logger.info("deleting superseded run %s of dt=%s", run_id, dt)
            _delete_run(root, dt, run_id, storage_cfg)


def remove_stale_runs(root: str, max_age_hours: float, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Deletes every unpublished `run=` folder under any date of `root` that started more than
    `max_age_hours` ago (a killed run's leftovers; see the module docstring); returns their paths."""
    fs, path = storage.filesystem_for(root, storage_cfg)
    cutoff = _now() - _dt.timedelta(hours=max_age_hours)
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[1]
        if info.type != pafs.FileType.Directory or not name.startswith("dt=") or not _DT.match(name[3:]):
            continue
        dt = name[3:]
        pointer = _read_json_or_none(storage.join_uri(partition_uri(root, dt), MANIFEST_NAME), storage_cfg)
        live = pointer.get("run_id") if isinstance(pointer, dict) else None
        for run_id in _run_folders(root, dt, storage_cfg):
            if run_id == live:
                continue
            _, started = _run_age_start(root, dt, run_id, storage_cfg)
            if started is None or started < cutoff:
                logger.info("deleting stale unpublished run %s of dt=%s (started %s)", run_id, dt, started)
                _delete_run(root, dt, run_id, storage_cfg)
                removed.append(run_uri(root, dt, run_id))
    return removed


def read_manifest(root: str, dt: str, storage_cfg: StorageConfig | None = None) -> dict | None:
    """The live manifest of a date, or None when nothing was published for it."""
    pointer = storage.join_uri(partition_uri(root, dt), MANIFEST_NAME)
    if not storage.exists(pointer, storage_cfg):
        return None
    manifest = storage.read_json(pointer, storage_cfg)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StorageError(f"{pointer}: expected format {MANIFEST_FORMAT!r}, got {manifest.get('format')!r}")
    return manifest


def published_dates(root: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    fs, path = storage.filesystem_for(root, storage_cfg)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[1]
        if info.type == pafs.FileType.Directory and name.startswith("dt="):
            if storage.exists(storage.join_uri(root, name, MANIFEST_NAME), storage_cfg):
                out.append(name[3:])
    return sorted(out)


def previous_published_date(root: str, dt: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """The newest date before `dt` with a pointer manifest under `root` (checked newest first), or None."""
    fs, path = storage.filesystem_for(root, storage_cfg)
    dates = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[1]
        if info.type == pafs.FileType.Directory and name.startswith("dt=") and _DT.match(name[3:]) and name[3:] < dt:
            dates.append(name[3:])
    for day in sorted(dates, reverse=True):
        if storage.exists(storage.join_uri(partition_uri(root, day), MANIFEST_NAME), storage_cfg):
            return day
    return None


def record_partition(root: str, dt: str, run_id: str, fields: dict[str, Any], rows: int,
                     storage_cfg: StorageConfig | None = None) -> dict:
    """For a run whose rows were committed elsewhere (the Iceberg sink, where the table's snapshot is the commit
    point): its manifest (`fields`, no files, `rows`) into its run folder, then the date's pointer (last writer
    wins: no run-order protocol); the date's other finished runs' folders are deleted."""
    run_dir = run_uri(root, dt, run_id)
    marker = _read_json_or_none(storage.join_uri(run_dir, RUN_MARKER), storage_cfg)
    started_at = marker["started_at"] if isinstance(marker, dict) and "started_at" in marker \
        else _now().isoformat(timespec="microseconds")
    manifest = {**fields, "format": MANIFEST_FORMAT, "dt": dt, "run_id": run_id, "data_dir": None, "files": [],
                "rows": rows, "started_at": started_at, "published_at": _now().isoformat(timespec="seconds")}
    storage.write_json(manifest, storage.join_uri(run_dir, MANIFEST_NAME), storage_cfg)
    storage.write_json(manifest, storage.join_uri(partition_uri(root, dt), MANIFEST_NAME), storage_cfg)
    storage.write_json({"run_id": run_id, "started_at": started_at, "state": "published"},
                       storage.join_uri(run_dir, RUN_MARKER), storage_cfg)
    _delete_finished_older_runs(root, dt, manifest, storage_cfg)
    return manifest


def read_partition(root: str, dt: str, storage_cfg: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """The live run of a date, read through its manifest (exactly the files it names)."""
    manifest = read_manifest(root, dt, storage_cfg)
    if manifest is None:
        raise StorageError(f"nothing published under {partition_uri(root, dt)} (no {MANIFEST_NAME})")
    if manifest.get("sink") == "iceberg":
        raise StorageError(f"{partition_uri(root, dt)}: run {manifest['run_id']} was committed to the Iceberg table "
                           f"{manifest['iceberg']['table']} (snapshot {manifest['iceberg']['snapshot_id']}); read it "
                           "from the table (pyiceberg, Spark, Trino, DuckDB)")
    fs, root_path = storage.filesystem_for(root, storage_cfg)
    paths = [f"{root_path}/{f['path']}" for f in manifest["files"]]
    if not paths:
        raise StorageError(f"{partition_uri(root, dt)}: the live run {manifest['run_id']} has no data files")
    table = pq.ParquetDataset(paths, filesystem=fs).read(columns=columns)
    if table.num_rows != manifest["rows"]:
        raise StorageError(
            f"{partition_uri(root, dt)}: read {table.num_rows} rows, the manifest lists {manifest['rows']}"
        )
    return table

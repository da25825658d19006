"""The Iceberg sink of the nightly scores (score.sink: iceberg): a table partitioned by `dt` (identity), where
each run replaces its date's partition in ONE atomic snapshot.

    IcebergSink.open(score, output, storage_cfg)   the catalog and the table (created on first use)
    sink.data_uri(dt, run_id)                      where the run's Parquet files go: inside the table's location
    sink.commit(dt, run_id, data_uri, props)       one snapshot: the date's old files out, the run's files in
    sink.read_date(dt, columns)                    a date's rows at the current snapshot
    sink.record()                                  table, location and catalog type for the manifest
    with_dt(batch, dt)                             the `dt` column, added before Ray Data writes the files
    catalog_properties(score, output, storage_cfg) what pyiceberg's load_catalog receives

Why not Ray Data's `write_iceberg(mode=OVERWRITE, overwrite_filter=...)`: in Ray 2.60 it commits
`txn.delete(filter)` then an append, two snapshots (a reader time-travelling to the parent of the new data
finds the date empty), and the delete is PyIceberg's copy-on-write path run on the driver (ray-project/ray
#66133, open). Here Ray Data writes the run's Parquet files straight into the table's location
(`<table location>/data/dt=D/run=R/`, with a `dt` column so that the partition is read from the files'
statistics); the driver then registers them with one `_OverwriteFiles` snapshot producer (pyiceberg's
`update_snapshot().overwrite()`): every data file of partition dt=D deleted, the run's files appended, one
OVERWRITE snapshot (an APPEND when the date had none). Files of a run that fails before that commit are
deleted by the pipeline, so a failed run commits nothing. A commit that loses a race with another writer
(CommitFailedException) is planned again against the new snapshot and retried (COMMIT_ATTEMPTS in all;
pyiceberg's own retries, which would keep the stale delete set, are turned off by the table property
commit.retry.num-retries=0), so two runs of one date leave one of them.
Superseded runs' files stay in the warehouse for time travel until the snapshots are expired (table
maintenance: `expire_snapshots`, then an orphan-file cleanup).

Catalogs: score.iceberg_catalog_uri a SQLAlchemy URL (sql catalog: sqlite:///..., postgresql://...) or an
http(s):// URL (REST catalog). Empty: the catalog named `binllm` in pyiceberg's own configuration
(~/.pyiceberg.yaml or PYICEBERG_CATALOG__BINLLM__* variables) when there is one, else the embedded SQLite
catalog <output>/iceberg/catalog.db (a local output only). score.iceberg_properties (key=value) pass through
to load_catalog; secrets (a REST token or credential, a database password) belong in pyiceberg's
configuration, never in score.* (the configuration is copied into every manifest). S3 data files use
pyiceberg's S3 FileIO with s3.endpoint, s3.region and the credentials of the storage settings.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, ValidationException
from pyiceberg.expressions import EqualTo
from pyiceberg.io.pyarrow import parquet_file_to_data_file
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import BooleanType, FloatType, NestedField, StringType
from pyiceberg.utils.config import Config as PyIcebergConfig

from binllm import storage
from binllm.config import ConfigError, ScoreConfig, StorageConfig
from binllm.pipeline.scorer import SCORE_SCHEMA

logger = logging.getLogger(__name__)

__all__ = ["CATALOG_NAME", "IcebergSink", "catalog_properties", "table_schema", "with_dt"]

CATALOG_NAME = "binllm"  # pyiceberg's configuration for it: PYICEBERG_CATALOG__BINLLM__*
COMMIT_ATTEMPTS = 5
NAME_MAPPING = "schema.name-mapping.default"  # Ray Data's files carry no field ids: columns are found by name
# pyiceberg (0.12) retries a conflicting commit itself, re-using the delete set planned against the old snapshot;
# off for this table: `commit` re-plans the date's files and retries instead.
NO_LIBRARY_RETRIES = {"commit.retry.num-retries": "0"}
_TYPES = {pa.string(): StringType(), pa.float32(): FloatType(), pa.bool_(): BooleanType()}


def table_schema() -> Schema:
    """The scores' columns (binllm.pipeline.scorer.SCORE_SCHEMA) plus `dt`, all optional."""
    fields = [NestedField(i, f.name, _TYPES[f.type], required=False) for i, f in enumerate(SCORE_SCHEMA, start=1)]
    return Schema(*fields, NestedField(len(fields) + 1, "dt", StringType(), required=False))


def with_dt(batch: pa.Table, dt: str) -> pa.Table:
    return batch.append_column("dt", pa.array([dt] * batch.num_rows, pa.string()))


def _extra_properties(score: ScoreConfig) -> dict[str, str]:
    out = {}
    for item in score.iceberg_properties:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config key 'score.iceberg_properties': expected key=value items, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _s3_properties(storage_cfg: StorageConfig | None) -> dict[str, str]:
    s = storage.resolve_s3_settings(storage_cfg)
    pairs = {"s3.endpoint": s["endpoint_url"], "s3.region": s["region"], "s3.access-key-id": s["access_key_id"],
             "s3.secret-access-key": s["secret_access_key"], "s3.session-token": s["session_token"]}
    return {k: v for k, v in pairs.items() if v}


def _default_uri(score: ScoreConfig, output: str) -> str | None:
    """The configured URI; empty: None when pyiceberg's own configuration has the catalog, else the SQLite file."""
    uri = score.iceberg_catalog_uri
    if uri:
        if urlparse(uri).password:
            raise ConfigError("config key 'score.iceberg_catalog_uri': holds a password, and the configuration is "
                              "copied into every manifest; leave the key empty and configure the catalog "
                              f"{CATALOG_NAME!r} in ~/.pyiceberg.yaml or PYICEBERG_CATALOG__BINLLM__URI instead")
        return uri
    if PyIcebergConfig().get_catalog_config(CATALOG_NAME):
        return None
    if storage.is_s3(output):
        raise ConfigError("config key 'score.iceberg_catalog_uri': required when score.output is on S3 (the "
                          "default SQLite catalog is a local file); set a SQLAlchemy URL or a REST catalog's URL")
    _, path = storage.filesystem_for(storage.join_uri(output, "iceberg"))
    os.makedirs(path, exist_ok=True)
    return f"sqlite:///{path}/catalog.db"


def catalog_properties(score: ScoreConfig, output: str, storage_cfg: StorageConfig | None) -> dict[str, str]:
    """pyiceberg's load_catalog properties: type and uri, the warehouse, S3 settings, score.iceberg_properties."""
    props = _s3_properties(storage_cfg)
    uri = _default_uri(score, output)
    if uri is not None:
        props |= {"uri": uri, "type": "rest" if uri.startswith(("http://", "https://")) else "sql"}
    warehouse = score.iceberg_warehouse or storage.join_uri(output, "iceberg")
    if not storage.is_s3(warehouse) and "://" not in warehouse:
        warehouse = f"file://{storage.filesystem_for(warehouse)[1]}"
    if props.get("type") != "rest":
        props["warehouse"] = warehouse  # a REST catalog names its own warehouse (iceberg_properties: warehouse=)
    return props | _extra_properties(score)


def _open_table(catalog: Catalog, identifier: str) -> Table:
    try:
        return catalog.load_table(identifier)
    except NoSuchTableError:
        pass
    catalog.create_namespace_if_not_exists(identifier.rsplit(".", 1)[0])
    schema = table_schema()
    spec = PartitionSpec(PartitionField(source_id=schema.find_field("dt").field_id, field_id=1000,
                                        transform=IdentityTransform(), name="dt"))
    return catalog.create_table_if_not_exists(identifier, schema=schema, partition_spec=spec,
                                              properties={NAME_MAPPING: schema.name_mapping.model_dump_json(),
                                                          **NO_LIBRARY_RETRIES})


def _local_or_s3(location: str) -> str:
    """A table location (file:///..., s3://...) as the pipeline's storage reaches it."""
    return urlparse(location).path if location.startswith("file://") else location


@dataclass
class IcebergSink:
    table: Table
    catalog_type: str

    @classmethod
    def open(cls, score: ScoreConfig, output: str, storage_cfg: StorageConfig | None) -> IcebergSink:
        """The table score.iceberg_table (created, partitioned by dt, when missing); ConfigError when the key is not
        namespace.table or the table's columns are not the scores'."""
        if score.iceberg_table.count(".") < 1 or not all(score.iceberg_table.split(".")):
            raise ConfigError(f"config key 'score.iceberg_table': expected namespace.table, got {score.iceberg_table!r}")
        props = catalog_properties(score, output, storage_cfg)
        table = _open_table(load_catalog(CATALOG_NAME, **props), score.iceberg_table)
        names, wanted = [f.name for f in table.schema().fields], [f.name for f in table_schema().fields]
        if names != wanted or [f.name for f in table.spec().fields] != ["dt"]:
            raise ConfigError(f"config key 'score.iceberg_table': {score.iceberg_table} has columns {names} partitioned "
                              f"by {[f.name for f in table.spec().fields]}; expected {wanted} partitioned by dt")
        return cls(table, props.get("type", "from pyiceberg's configuration"))

    def data_uri(self, dt: str, run_id: str) -> str:
        return storage.join_uri(_local_or_s3(self.table.location()), "data", f"dt={dt}", f"run={run_id}")

    def record(self) -> dict[str, Any]:
        return {"table": ".".join(self.table.name()), "location": self.table.location(),
                "catalog_type": self.catalog_type}

    def _data_files(self, data_uri: str, storage_cfg: StorageConfig | None) -> list:
        scheme = "s3://" if storage.is_s3(data_uri) else "file://"
        paths = [scheme + i.path for i in storage.list_files(data_uri, storage_cfg) if i.path.endswith(".parquet")]
        return [parquet_file_to_data_file(self.table.io, self.table.metadata, p) for p in paths]

    def commit(self, dt: str, run_id: str, data_uri: str, storage_cfg: StorageConfig | None,
               properties: dict[str, str]) -> int:
        """Replaces partition dt with the Parquet files under `data_uri` in one snapshot; returns its id."""
        data_files = self._data_files(data_uri, storage_cfg)
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            self.table.refresh()
            old = [task.file for task in self.table.scan(row_filter=EqualTo("dt", dt)).plan_files()]
            txn = self.table.transaction()
            if txn.table_metadata.name_mapping() is None:
                txn.set_properties(**{NAME_MAPPING: txn.table_metadata.schema().name_mapping.model_dump_json()})
            if any(txn.table_metadata.properties.get(k) != v for k, v in NO_LIBRARY_RETRIES.items()):
                txn.set_properties(**NO_LIBRARY_RETRIES)
            update = txn.update_snapshot(snapshot_properties={"binllm.run_id": run_id, "binllm.dt": dt, **properties})
            with (update.overwrite() if old else update.fast_append()) as snapshot:
                for data_file in old:
                    snapshot.delete_data_file(data_file)
                for data_file in data_files:
                    snapshot.append_data_file(data_file)
            try:
                return txn.commit_transaction().current_snapshot().snapshot_id
            except (CommitFailedException, ValidationException) as exc:  # another writer won: plan again
                if attempt == COMMIT_ATTEMPTS:
                    raise
                logger.info("commit of dt=%s (run %s) to %s lost to another writer (%s); planning again, attempt %d",
                            dt, run_id, ".".join(self.table.name()), type(exc).__name__, attempt + 1)
        raise AssertionError("unreachable")

    def read_date(self, dt: str, columns: list[str]) -> pa.Table:
        self.table.refresh()
        return self.table.scan(row_filter=EqualTo("dt", dt), selected_fields=tuple(columns)).to_arrow()

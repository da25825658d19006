"""The normalised interaction and item tables every importer returns, and their validation."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

# Numeric timestamps by magnitude: unix seconds stay below 1e11 until the year 5138, milliseconds below 1e14,
# microseconds below 1e17; larger values are nanoseconds.
_UNITS = (("seconds", 1e11, 1), ("milliseconds", 1e14, 10**3), ("microseconds", 1e17, 10**6),
          ("nanoseconds", float("inf"), 10**9))


class DataError(ValueError):
    """Input data that does not match what binllm expects; the message names the file and column."""


INTERACTIONS = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("rating", pa.float64()),
    ("label", pa.int8()), ("timestamp", pa.int64()),
])
ITEMS = pa.schema([("item_id", pa.string()), ("title", pa.string())])


def require_columns(table: pa.Table, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {table.column_names}")


def as_ids(column: pa.ChunkedArray, source: str, name: str) -> pa.ChunkedArray:
    if column.null_count:
        raise DataError(f"{source}: column '{name}' has {column.null_count} empty values; ids are required")
    if pa.types.is_floating(column.type):
        raise DataError(f"{source}: column '{name}' holds floating-point values; expected string or integer ids")
    return column.cast(pa.string())


def as_numbers(column: pa.ChunkedArray, source: str, name: str) -> pa.ChunkedArray:
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        out = column.cast(pa.float64())
    else:
        try:
            out = pc.cast(column.cast(pa.string()), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"{source}: column '{name}' must be numeric: {exc}") from None
    if out.null_count:
        raise DataError(f"{source}: column '{name}' has {out.null_count} empty values; expected numbers")
    return out


def as_timestamps(column: pa.ChunkedArray, source: str, name: str) -> pa.ChunkedArray:
    """int64 unix seconds from Arrow timestamps, or from numbers (or numeric strings) in seconds,
    milliseconds, microseconds or nanoseconds: the unit is told by magnitude, converted with a logged
    note, and a column that mixes units is refused."""
    if pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.timestamp("s", tz=column.type.tz), safe=False).cast(pa.int64())
    if pa.types.is_integer(column.type):  # exact: nanoseconds do not fit a float64's integers
        if column.null_count:
            raise DataError(f"{source}: column '{name}' has {column.null_count} empty values; expected numbers")
        values = column.cast(pa.int64()).to_numpy()
    else:
        values = as_numbers(column, source, name).to_numpy()
    magnitude = np.abs(values.astype(np.float64))
    classes = np.searchsorted(np.asarray([limit for _, limit, _ in _UNITS[:-1]]), magnitude, side="right")
    found = np.unique(classes)
    if len(found) > 1:
        units = [_UNITS[c][0] for c in found]
        raise DataError(f"{source}: column '{name}' mixes timestamp units ({', '.join(units)} by magnitude); "
                        "expected one unit for the whole column (unix seconds, or ms / us / ns)")
    unit, _, per_second = _UNITS[int(found[0])] if len(found) else _UNITS[0]
    if per_second != 1:
        log.warning("%s: column '%s' holds unix %s (largest %d); converted to seconds", source, name, unit,
                    int(magnitude.max()))
    if values.dtype.kind == "i":
        return pa.chunked_array([values // per_second])
    return pa.chunked_array([np.floor(values / per_second).astype(np.int64)])


def normalise_interactions(user, item, rating, label, timestamp, source: str) -> pa.Table:
    """Builds the INTERACTIONS table; exactly one of rating / label may be None."""
    n = len(user)
    if n == 0:
        raise DataError(f"{source}: no interactions (the input is empty)")
    if label is not None:
        labels = as_numbers(label, source, "label")
        bad = pc.sum(pc.invert(pc.is_in(labels, pa.array([0.0, 1.0])))).as_py()
        if bad:
            raise DataError(f"{source}: column 'label' must hold 0/1, found {bad} other values")
        label = labels.cast(pa.int8())
    return pa.table({
        "user_id": as_ids(user, source, "user_id"),
        "item_id": as_ids(item, source, "item_id"),
        "rating": as_numbers(rating, source, "rating") if rating is not None else pa.nulls(n, pa.float64()),
        "label": label if label is not None else pa.nulls(n, pa.int8()),
        "timestamp": as_timestamps(timestamp, source, "timestamp"),
    }, schema=INTERACTIONS)


def normalise_items(item, title, source: str, title_column: str = "title") -> pa.Table:
    """The ITEMS table; a missing title becomes the item's id, and a catalog with no title at all is refused."""
    if len(title) and pc.sum(pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(title.cast(pa.string())), ""),
                                          False)).as_py() == 0:
        raise DataError(f"{source}: column '{title_column}' is empty on every row, so no prompt would have a title; "
                        "map data.columns.title to the column with the item names")
    if title.null_count:
        title = pc.if_else(pc.is_null(title), item.cast(pa.string()), title)
    items = pa.table({"item_id": as_ids(item, source, "item_id"), "title": title.cast(pa.string())}, schema=ITEMS)
    unique = pc.count_distinct(items.column("item_id")).as_py()
    if unique != items.num_rows:
        raise DataError(f"{source}: column 'item_id' has {items.num_rows - unique} duplicated ids")
    return items

"""AUC, UAUC (per-user AUC, equal weight, one-class users skipped) and the warm/cold report."""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pyarrow as pa


def _rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties; nan when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank within runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """p(click) of each logit, float32 (computed in float64: no overflow warnings at |logit| > 88)."""
    return (1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))).astype(np.float32)


def auc(labels, scores) -> float:
    """ROC AUC over all rows; nan when only one class is present or any score is NaN (a diverged model
    must not get a rank-based AUC)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if len(labels) != len(scores):
        raise ValueError(f"auc: {len(labels)} labels but {len(scores)} scores")
    if np.isnan(scores.astype(np.float64, copy=False)).any():
        return float("nan")
    return _rank_auc(labels, scores)


def uauc(user_ids, labels, scores) -> float:
    """Mean of per-user AUCs over users with both classes, each user weighted equally."""
    user_ids, labels, scores = np.asarray(user_ids), np.asarray(labels), np.asarray(scores)
    if not (len(user_ids) == len(labels) == len(scores)):
        raise ValueError("uauc: user_ids, labels and scores must have the same length")
    if len(user_ids) == 0:
        return math.nan
    order = np.argsort(user_ids, kind="stable")
    sorted_users = user_ids[order]
    cuts = np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1
    values = []
    for group in np.split(order, cuts):
        value = _rank_auc(labels[group], scores[group])
        if not math.isnan(value):
            values.append(value)
    return float(np.mean(values)) if values else math.nan


def evaluate_scores(examples: pa.Table, scores: np.ndarray) -> dict[str, float]:
    """AUC/UAUC on all rows and on the warm/cold subsets of `examples` (user_id, label, warm)."""
    users = np.asarray(examples.column("user_id").to_pylist(), dtype=object)
    labels = examples.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
    warm = examples.column("warm").to_numpy(zero_copy_only=False).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    out = {"rows": float(len(labels))}
    for name, mask in (("all", np.ones_like(warm)), ("warm", warm), ("cold", ~warm)):
        out[f"{name}_auc"] = auc(labels[mask], scores[mask])
        out[f"{name}_uauc"] = uauc(users[mask], labels[mask], scores[mask])
        out[f"{name}_rows"] = float(mask.sum())
    return out


def report_table(results: Mapping[str, Mapping[str, float]]) -> pa.Table:
    """One row per method with AUC/UAUC overall, warm and cold."""
    columns = ["all_auc", "all_uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc", "all_rows", "warm_rows", "cold_rows"]
    data = {"method": pa.array(list(results), type=pa.string())}
    for col in columns:
        data[col] = pa.array([float(r.get(col, math.nan)) for r in results.values()], type=pa.float64())
    return pa.table(data)


def format_report(table: pa.Table) -> str:
    """The report as a fixed-width text table (nan shown as '-')."""
    headers = ["method", "AUC", "UAUC", "warm AUC", "warm UAUC", "cold AUC", "cold UAUC"]
    cols = ["all_auc", "all_uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc"]
    rows = []
    for i in range(table.num_rows):
        row = [table.column("method")[i].as_py()]
        for c in cols:
            v = table.column(c)[i].as_py()
            row.append("-" if v is None or math.isnan(v) else f"{v:.4f}")
        rows.append(row)
    widths = [max(len(str(r[j])) for r in [headers, *rows]) for j in range(len(headers))]
    line = lambda r: "  ".join(str(v).ljust(w) if j == 0 else str(v).rjust(w) for j, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])

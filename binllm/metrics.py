"""AUC, UAUC (per-user AUC, equal weight, one-class users skipped), log loss, calibration error, the
warm/cold report, and paired-bootstrap intervals of AUC differences between methods on the same rows."""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

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


def uauc_users(user_ids, labels) -> int:
    """How many users UAUC averages over: users with both a positive and a negative row."""
    user_ids, labels = np.asarray(user_ids), np.asarray(labels).astype(bool)
    if len(user_ids) != len(labels):
        raise ValueError(f"uauc_users: {len(user_ids)} user ids but {len(labels)} labels")
    return int(np.intersect1d(np.unique(user_ids[labels]), np.unique(user_ids[~labels])).size)


def _labels_and_logits(name: str, labels, logits) -> tuple[np.ndarray, np.ndarray]:
    labels, logits = np.asarray(labels, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    if labels.shape != logits.shape or labels.ndim != 1:
        raise ValueError(f"{name}: {labels.shape} labels but {logits.shape} logits (one of each per row)")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"{name}: labels must be 0 or 1")
    return labels, logits


def log_loss(labels, logits) -> float:
    """Mean binary cross-entropy (nats) of sigmoid(logit), from the logits (no overflow at any |logit|);
    nan with no rows or any NaN logit."""
    labels, logits = _labels_and_logits("log_loss", labels, logits)
    if len(labels) == 0 or np.isnan(logits).any():
        return math.nan
    return float(np.mean(np.maximum(logits, 0.0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))))


def calibration_error(labels, logits, bins: int = 10) -> float:
    """Expected calibration error of sigmoid(logit) over equal-mass bins: the rows sorted by p(click) are cut
    into `bins` runs of (nearly) equal size, and each run adds its share of rows times |mean label - mean p|.
    nan with no rows or any NaN logit."""
    labels, logits = _labels_and_logits("calibration_error", labels, logits)
    if bins < 1:
        raise ValueError(f"calibration_error: bins must be >= 1, got {bins}")
    if len(labels) == 0 or np.isnan(logits).any():
        return math.nan
    probs = sigmoid(logits).astype(np.float64)
    order = np.argsort(probs, kind="stable")
    return float(sum(len(run) * abs(labels[run].mean() - probs[run].mean())
                     for run in np.array_split(order, min(bins, len(order)))) / len(order))


def evaluate_scores(examples: pa.Table, scores: np.ndarray) -> dict[str, float]:
    """AUC/UAUC and UAUC's user count on all rows and on the warm/cold subsets of `examples` (user_id,
    label, warm); log loss and ECE (`calibration_error`) of the logits `scores` on all rows."""
    users = np.asarray(examples.column("user_id").to_pylist(), dtype=object)
    labels = examples.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
    warm = examples.column("warm").to_numpy(zero_copy_only=False).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    out = {"rows": float(len(labels))}
    for name, mask in (("all", np.ones_like(warm)), ("warm", warm), ("cold", ~warm)):
        out[f"{name}_auc"] = auc(labels[mask], scores[mask])
        out[f"{name}_uauc"] = uauc(users[mask], labels[mask], scores[mask])
        out[f"{name}_rows"] = float(mask.sum())
        out[f"{name}_uauc_users"] = float(uauc_users(users[mask], labels[mask]))
    out["all_log_loss"] = log_loss(labels, scores)
    out["all_ece"] = calibration_error(labels, scores)
    return out


REPORT_COLUMNS = ["all_auc", "all_uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc", "all_rows", "warm_rows",
                  "cold_rows", "all_uauc_users", "warm_uauc_users", "cold_uauc_users", "all_log_loss", "all_ece"]


def report_table(results: Mapping[str, Mapping[str, float]]) -> pa.Table:
    """One row per method with AUC/UAUC (and UAUC's user count) overall, warm and cold, log loss and ECE."""
    data = {"method": pa.array(list(results), type=pa.string())}
    for col in REPORT_COLUMNS:
        data[col] = pa.array([float(r.get(col, math.nan)) for r in results.values()], type=pa.float64())
    return pa.table(data)


def format_report(table: pa.Table) -> str:
    """The report as a fixed-width text table (nan shown as '-')."""
    headers = ["method", "AUC", "UAUC", "users", "warm AUC", "warm UAUC", "users", "cold AUC", "cold UAUC", "users",
               "log loss", "ECE"]
    cols = ["all_auc", "all_uauc", "all_uauc_users", "warm_auc", "warm_uauc", "warm_uauc_users", "cold_auc",
            "cold_uauc", "cold_uauc_users", "all_log_loss", "all_ece"]
    rows = []
    for i in range(table.num_rows):
        row = [table.column("method")[i].as_py()]
        for c in cols:
            v = table.column(c)[i].as_py() if c in table.column_names else None
            if v is None or math.isnan(v):
                row.append("-")
            else:
                row.append(f"{v:.0f}" if c.endswith("_users") else f"{v:.4f}")
        rows.append(row)
    widths = [max(len(str(r[j])) for r in [headers, *rows]) for j in range(len(headers))]
    line = lambda r: "  ".join(str(v).ljust(w) if j == 0 else str(v).rjust(w) for j, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


N_BOOT = 1000  # bootstrap resamples of the reports' AUC differences
PAPER_PAIRS = (  # (better, worse) in the paper's Table 2
    ("BinLLM", "BinMF"), ("BinLLM", "IO"), ("BinLLM", "IT"), ("BinLLM", "TO"), ("IO", "BinMF"), ("IT", "BinMF"),
    ("BinMF", "TO"), ("TO", "MF"), ("BinMF", "MF"))
REPORT_PAIRS = PAPER_PAIRS + (("Blend", "BinMF"), ("Blend", "BinLLM"))  # + the post-hoc blend (evaluate)
_FORMAT_SUFFIX = re.compile(r"^(.*) \(([^()]+)\)$")


def _split_format(name: str) -> tuple[str, str | None]:
    """'BinLLM (binary)' -> ('BinLLM', 'binary'); 'BinMF' -> ('BinMF', None)."""
    match = _FORMAT_SUFFIX.match(name)
    return (match.group(1), match.group(2)) if match else (name, None)


def match_pairs(pairs: Sequence[tuple[str, str]], methods: Sequence[str]) -> list[tuple[str, str]]:
    """The pairs as names from `methods`: a name present as is stands for itself, otherwise it stands for every
    method '<name> (<format>)'; two formatted names pair only when their formats agree. Pairs with a side
    absent are dropped; order follows `pairs`, then `methods`."""
    parsed = {m: _split_format(m) for m in methods}

    def candidates(name: str) -> list[str]:
        return [name] if name in parsed else [m for m, (base, fmt) in parsed.items() if base == name and fmt]

    matched = []
    for a, b in pairs:
        for ma in candidates(a):
            for mb in candidates(b):
                fa, fb = parsed[ma][1], parsed[mb][1]
                if ma != mb and (fa is None or fb is None or fa == fb) and (ma, mb) not in matched:
                    matched.append((ma, mb))
    return matched


def _bootstrap_aucs(labels: np.ndarray, scores: Sequence[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """[methods, n_boot] AUC of each method on the same row resamples (drawn with replacement); nan for a
    resample with one class, and for a method with any NaN score."""
    labels = np.asarray(labels).astype(bool)
    n = len(labels)
    rng = np.random.default_rng(seed)
    sorted_methods = []
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        if np.isnan(s).any():
            sorted_methods.append(None)
            continue
        order = np.argsort(s, kind="mergesort")
        starts = np.concatenate([[0], np.flatnonzero(np.diff(s[order])) + 1])
        sorted_methods.append((order, starts, labels[order]))
    out = np.full((len(scores), n_boot), np.nan)
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for first in range(0, n_boot, chunk):
        size = min(chunk, n_boot - first)
        draws = rng.integers(0, n, size=(size, n)) + (np.arange(size) * n)[:, None]
        counts = np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)
        for m, prepared in enumerate(sorted_methods):
            if prepared is None:
                continue
            order, starts, sorted_labels = prepared
            weights = counts[:, order]
            pos = np.add.reduceat(np.where(sorted_labels, weights, 0), starts, axis=1).astype(np.float64)
            neg = np.add.reduceat(np.where(sorted_labels, 0, weights), starts, axis=1).astype(np.float64)
            below = np.cumsum(neg, axis=1) - neg
            n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                aucs = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
            out[m, first:first + size] = np.where((n_pos > 0) & (n_neg > 0), aucs, np.nan)
    return out


def _diff_summary(diff: float, boot_diffs: np.ndarray, alpha: float) -> dict[str, float]:
    valid = boot_diffs[~np.isnan(boot_diffs)]
    if math.isnan(diff) or len(valid) == 0:
        return {"diff": diff, "low": math.nan, "high": math.nan, "p_le_0": math.nan, "n_boot": len(valid)}
    low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return {"diff": diff, "low": float(low), "high": float(high), "p_le_0": float(np.mean(valid <= 0)),
            "n_boot": len(valid)}


def _check_bootstrap_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"bootstrap: alpha must be in (0, 1), got {alpha}")


def paired_bootstrap_auc_diff(labels, scores_a, scores_b, n_boot: int = 1000, seed: int = 0,
                              alpha: float = 0.05) -> dict[str, float]:
    """AUC(a) - AUC(b) on all rows (`diff`), its percentile interval at level 1 - alpha (`low`, `high`) and the
    share of resamples with a difference <= 0 (`p_le_0`) over `n_boot` row resamples drawn with
    replacement, the same rows for both methods; resamples with one class are skipped (`n_boot`: those
    used), `n_rows`: the rows. nan throughout when either method has a NaN score."""
    labels, scores_a, scores_b = np.asarray(labels), np.asarray(scores_a), np.asarray(scores_b)
    if not (len(labels) == len(scores_a) == len(scores_b)):
        raise ValueError(f"paired_bootstrap_auc_diff: {len(labels)} labels, {len(scores_a)} and {len(scores_b)} "
                         "scores (one per row each)")
    _check_bootstrap_args(n_boot, alpha)
    boot = _bootstrap_aucs(labels, [scores_a, scores_b], n_boot, seed)
    summary = _diff_summary(auc(labels, scores_a) - auc(labels, scores_b), boot[0] - boot[1], alpha)
    return {**summary, "n_rows": len(labels)}


PAIR_COLUMNS = ["a", "b", "diff", "low", "high", "p_le_0", "rows", "resamples"]


def pairwise_report(scores_by_method: Mapping[str, np.ndarray], labels, pairs: Sequence[tuple[str, str]],
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pa.Table:
    """One row per pair (a, b) with both methods in `scores_by_method` (scores of the same rows, in the same
    order): AUC(a) - AUC(b), its paired-bootstrap interval and P(diff <= 0) as in
    `paired_bootstrap_auc_diff`; every pair sees the same resamples."""
    labels = np.asarray(labels)
    _check_bootstrap_args(n_boot, alpha)
    pairs = [(a, b) for a, b in pairs if a in scores_by_method and b in scores_by_method]
    methods = list(dict.fromkeys(m for pair in pairs for m in pair))
    for m in methods:
        if len(scores_by_method[m]) != len(labels):
            raise ValueError(f"pairwise_report: method {m!r} has {len(scores_by_method[m])} scores for "
                             f"{len(labels)} rows")
    boot = _bootstrap_aucs(labels, [scores_by_method[m] for m in methods], n_boot, seed) if pairs else None
    full = {m: auc(labels, scores_by_method[m]) for m in methods}
    rows = []
    for a, b in pairs:
        ia, ib = methods.index(a), methods.index(b)
        rows.append({"a": a, "b": b, **_diff_summary(full[a] - full[b], boot[ia] - boot[ib], alpha)})
    return pa.table({
        "a": pa.array([r["a"] for r in rows], pa.string()), "b": pa.array([r["b"] for r in rows], pa.string()),
        **{c: pa.array([float(r[c]) for r in rows], pa.float64()) for c in ("diff", "low", "high", "p_le_0")},
        "rows": pa.array([len(labels)] * len(rows), pa.int64()),
        "resamples": pa.array([r["n_boot"] for r in rows], pa.int64()),
    })


def format_pairs(table: pa.Table) -> str:
    """A heading, then one line per pair of `pairwise_report`: 'a - b  +diff  [low, high]  P(<=0)=p  rows' (nan
    shown as '-'); empty for no pairs."""
    if table.num_rows == 0:
        return ""
    heading = (f"AUC difference on the same test rows, paired bootstrap 95% interval "
               f"({max(table.column('resamples').to_pylist())} resamples), P(<=0): share of resamples with "
               "difference <= 0")
    signed = lambda v: "-" if v is None or math.isnan(v) else f"{v:+.4f}"
    rows = table.to_pylist()
    labels = [f"{r['a']} - {r['b']}" for r in rows]
    width = max(map(len, labels))
    lines = []
    for label, r in zip(labels, rows):
        p = "-" if math.isnan(r["p_le_0"]) else f"{r['p_le_0']:.3f}"
        lines.append(f"{label.ljust(width)}  {signed(r['diff']):>7}  [{signed(r['low'])}, {signed(r['high'])}]  "
                     f"P(<=0)={p}  {r['rows']} rows")
    return "\n".join([heading, *lines])

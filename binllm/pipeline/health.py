"""The nightly health report of a scoring run: the distribution of its scores and its drift against the
previous published date of the same output, recorded in the run's manifest (field `health`) with a PNG of
the two score histograms in the run folder (`dt=D/run=R/_health.png`).

    check_settings(score)                         score.max_psi >= 0, score.drift_top_k >= 1 (ConfigError)
    score_summary(table)                          quantiles, mean, text-only fallback share, pairs per user
    psi(previous, current)                        population stability index (formula below)
    top_k_overlap(previous, current, k)           mean Jaccard of each common user's top-k items by score
    health_report(current, previous, dt, k)       the manifest's `health` field
    check_drift(report, max_psi)                  DriftTooLarge when the PSI exceeds score.max_psi (> 0)
    drift_png(current, previous, report)          the histogram PNG (bytes)
    PreviousDate, DriftTooLarge, HEALTH_PLOT, COLUMNS, PSI_BINS, PSI_EPSILON

PSI: the previous date's scores cut into PSI_BINS = 10 equal-mass bins (inner edges q_1..q_9 = the previous
scores' 10%, ..., 90% quantiles, numpy's linear interpolation; a score s falls in bin #{j: q_j <= s}); with
e_i and a_i the shares of the previous and of today's scores in bin i, each floored at PSI_EPSILON = 1e-4
(an empty bin),

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

0 for identical distributions; a common reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 large shift.

Top-K overlap: for each user scored on both dates, the set of their k highest-scored items on each date (ties
by item id), Jaccard |A & B| / |A | B|; the report gives the mean over those common users and their count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from binllm.config import ConfigError, ScoreConfig
from binllm.pipeline.inputs import InputError
from binllm.plots import score_drift_png

__all__ = ["COLUMNS", "HEALTH_PLOT", "PSI_BINS", "PSI_EPSILON", "DriftTooLarge", "PreviousDate", "check_drift",
           "check_settings", "drift_png", "health_report", "psi", "score_summary", "top_k_overlap"]

HEALTH_PLOT = "_health.png"  # in the run folder: '_' keeps it out of hive readers' and the manifest's file lists
COLUMNS = ["user_id", "item_id", "score"]  # what the drift needs of a date's rows
PSI_BINS = 10
PSI_EPSILON = 1e-4
QUANTILES = {"p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99}


class DriftTooLarge(InputError):
    """The run's scores moved further from the previous published date than score.max_psi allows."""


@dataclass(frozen=True)
class PreviousDate:
    """The newest published date before a run's date: its live run's (user_id, item_id, score) rows."""
    dt: str
    run_id: str
    rows: pa.Table


def check_settings(score: ScoreConfig) -> None:
    if score.max_psi < 0:
        raise ConfigError(f"config key 'score.max_psi': expected >= 0 (0: off), got {score.max_psi:g}")
    if score.drift_top_k < 1:
        raise ConfigError(f"config key 'score.drift_top_k': expected >= 1, got {score.drift_top_k}")


def _round(value: float) -> float:
    return round(float(value), 6)


def score_summary(table: pa.Table) -> dict:
    """Of a run's rows (score, user_id and, when present, fallback): rows, users, mean, the QUANTILES,
    the share of text-only fallbacks and the pairs per user (min / median / max)."""
    scores = table.column("score").to_numpy().astype(np.float64)
    per_user = table.group_by("user_id").aggregate([("user_id", "count")]).column("user_id_count").to_numpy()
    out = {
        "rows": int(table.num_rows),
        "users": int(len(per_user)),
        "mean": _round(scores.mean()),
        "quantiles": {name: _round(v) for name, v in zip(QUANTILES, np.quantile(scores, list(QUANTILES.values())))},
        "pairs_per_user": {"min": int(per_user.min()), "median": _round(np.median(per_user)),
                           "max": int(per_user.max())},
    }
    if "fallback" in table.column_names:
        out["fallback_share"] = _round(int(pc.sum(table.column("fallback")).as_py() or 0) / table.num_rows)
    return out


def _bin_shares(values: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins) / len(values)


def psi(previous, current, bins: int = PSI_BINS, eps: float = PSI_EPSILON) -> float:
    """The population stability index of `current` against `previous` (module docstring)."""
    prev = np.asarray(previous, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if len(prev) == 0 or len(cur) == 0:
        raise ValueError("psi: both score arrays must be non-empty")
    edges = np.quantile(prev, np.arange(1, bins) / bins)
    expected = np.maximum(_bin_shares(prev, edges, bins), eps)
    actual = np.maximum(_bin_shares(cur, edges, bins), eps)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _top_items(table: pa.Table, k: int) -> pa.Table:
    """(user_id, item_id) of each user's k highest-scored items, ties by item id."""
    ranked = table.select(COLUMNS).sort_by([("user_id", "ascending"), ("score", "descending"),
                                            ("item_id", "ascending")])
    users = ranked.column("user_id").combine_chunks()
    n = len(users)
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = pc.not_equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False)
    positions = np.arange(n)
    rank = positions - np.maximum.accumulate(np.where(starts, positions, 0))
    return ranked.filter(pa.array(rank < k)).select(["user_id", "item_id"])


def top_k_overlap(previous: pa.Table, current: pa.Table, k: int) -> dict:
    """Mean Jaccard of the common users' top-k item sets (module docstring); mean is None without common users."""
    before, after = _top_items(previous, k), _top_items(current, k)
    n_before = before.group_by("user_id").aggregate([("item_id", "count")]).rename_columns(["user_id", "n_before"])
    n_after = after.group_by("user_id").aggregate([("item_id", "count")]).rename_columns(["user_id", "n_after"])
    both = before.join(after, ["user_id", "item_id"], join_type="inner").group_by("user_id").aggregate(
        [("item_id", "count")]).rename_columns(["user_id", "n_both"])
    common = n_before.join(n_after, "user_id", join_type="inner").join(both, "user_id", join_type="left outer")
    inter = pc.fill_null(common.column("n_both"), 0).to_numpy().astype(np.float64)
    union = common.column("n_before").to_numpy() + common.column("n_after").to_numpy() - inter
    jaccard = inter / union
    return {"metric": "mean_jaccard", "k": k, "mean": _round(jaccard.mean()) if len(jaccard) else None,
            "common_users": int(len(jaccard))}


def health_report(current: pa.Table, previous: PreviousDate | None, dt: str, k: int) -> dict:
    """The manifest's `health` field: `scores` (score_summary) and `drift` against the previous date (PSI and
    top-k overlap; null values with a `reason` when no date before `dt` was published)."""
    report = {"scores": score_summary(current)}
    if previous is None:
        report["drift"] = {"previous_dt": None, "previous_run_id": None, "psi": None, "top_k_overlap": None,
                           "reason": f"no date before {dt} is published under this output"}
        return report
    report["drift"] = {
        "previous_dt": previous.dt, "previous_run_id": previous.run_id, "previous_rows": previous.rows.num_rows,
        "psi": _round(psi(previous.rows.column("score").to_numpy(), current.column("score").to_numpy())),
        "psi_bins": PSI_BINS, "psi_epsilon": PSI_EPSILON,
        "top_k_overlap": top_k_overlap(previous.rows, current, k),
    }
    return report


def check_drift(report: dict, max_psi: float, dt: str) -> None:
    """DriftTooLarge (one line) when score.max_psi > 0 and the report's PSI exceeds it."""
    drift = report["drift"]
    if max_psi > 0 and drift["psi"] is not None and drift["psi"] > max_psi:
        raise DriftTooLarge(
            f"score.max_psi {max_psi:g} exceeded: the PSI of the scores of dt={dt} against the previous published "
            f"date dt={drift['previous_dt']} is {drift['psi']:.4f}; the run was not published (the published "
            f"results are left as they were)")


def drift_png(current: pa.Table, previous: PreviousDate | None, report: dict, dt: str) -> bytes:
    """Today's score histogram over the previous date's, titled with the PSI and the overlap."""
    drift = report["drift"]
    if previous is None:
        title = f"scores of dt={dt} ({current.num_rows} pairs); no previous date"
    else:
        overlap = drift["top_k_overlap"]
        title = (f"dt={dt} ({current.num_rows} pairs) over dt={previous.dt} ({previous.rows.num_rows}): "
                 f"PSI {drift['psi']:.3f}, top-{overlap['k']} Jaccard {overlap['mean']}")
    return score_drift_png(current.column("score").to_numpy(),
                           previous.rows.column("score").to_numpy() if previous else None, title,
                           (f"dt={dt}", f"dt={previous.dt}" if previous else ""))

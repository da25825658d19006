"""PNG plots of an evaluation: AUC bars per method (all / warm / cold), validation AUC per training step,
score distributions by label, a nightly run's scores over the previous date's. matplotlib's Agg backend: no
display needed."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_auc_bars(rows: list[dict], path: Path) -> Path:
    """Grouped bars: AUC over all, warm and cold test rows, one group per method (rows of report_table)."""
    plt = _pyplot()
    methods = [r["method"] for r in rows]
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 4.2))
    for offset, (key, label) in zip((-0.27, 0.0, 0.27), (("all_auc", "all"), ("warm_auc", "warm"), ("cold_auc", "cold"))):
        values = [r[key] if r[key] is not None and not math.isnan(r[key]) else 0.0 for r in rows]
        bars = ax.bar(x + offset, values, width=0.27, label=label)
        ax.bar_label(bars, labels=[f"{v:.3f}" if v else "-" for v in values], fontsize=6, rotation=90, padding=2)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("test AUC")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_validation_curves(stages_by_method: dict[str, list[dict]], path: Path,
                           references: dict[str, float] | None = None) -> Path:
    """Validation AUC of every LLM training stage (stage 2 continues stage 1) against the prompts tuned so far
    (optimizer steps where a stage does not record its prompts a step); `references`: a labelled AUC each, drawn
    across (say BinMF's on the same validation rows)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    curves = {method: [s for s in stages if s.get("prompt_kind") and any("auc" in h for h in s.get("history", []))]
              for method, stages in stages_by_method.items()}  # encoders (epochs, not LLM steps) left out
    by_prompts = all(s.get("prompts_per_step") for stages in curves.values() for s in stages)
    for method, stages in curves.items():
        offset = 0.0
        for stage in stages:
            history = [h for h in stage["history"] if "auc" in h]
            scale = stage["prompts_per_step"] if by_prompts else 1
            xs = [offset + h["step"] * scale for h in history]
            ax.plot(xs, [h["auc"] for h in history], marker=".", markersize=3, linewidth=1,
                    label=f"{method}: {stage['name']} ({stage['prompt_kind']})")
            offset = xs[-1]
    for k, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=f"C{k + 5}", linewidth=1, linestyle=":", label=f"{label} {value:.4f}")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("prompts tuned" if by_prompts else "optimizer step")
    ax.set_ylabel("validation AUC")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_score_distributions(methods: list[str], logits: list[np.ndarray], labels: np.ndarray, path: Path) -> Path:
    """One panel per method: histograms of the test scores of clicked (1) and not clicked (0) rows."""
    plt = _pyplot()
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.4 * rows), squeeze=False)
    for ax, method, scores in zip(axes.flat, methods, logits):
        scores = np.asarray(scores, dtype=np.float64)
        finite = np.isfinite(scores)
        ax.set_title(method if finite.all() else f"{method} ({int((~finite).sum())} non-finite)", fontsize=8)
        if finite.any():
            bins = np.histogram_bin_edges(scores[finite], bins=40)
            for value, color in ((0, "tab:red"), (1, "tab:blue")):
                ax.hist(scores[finite & (labels == value)], bins=bins, alpha=0.5, color=color, density=True,
                        label=f"label {value}")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_drift_png(current: np.ndarray, previous: np.ndarray | None, title: str, labels: tuple[str, str]) -> bytes:
    """PNG bytes: a histogram of today's scores (p(click), 40 bins over [0, 1], density) drawn over the previous
    date's; `labels` names the two (today's first). Without a previous date only today's is drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    bins = np.linspace(0.0, 1.0, 41)
    if previous is not None and len(previous):
        ax.hist(np.asarray(previous, dtype=np.float64), bins=bins, density=True, alpha=0.45, color="tab:grey",
                label=labels[1])
    ax.hist(np.asarray(current, dtype=np.float64), bins=bins, density=True, alpha=0.55, color="tab:blue",
            label=labels[0])
    ax.set_xlabel("score (p(click))")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()

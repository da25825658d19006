"""The paper's table: MF, BinMF, TO, IO, IT and two-step BinLLM (binary and dotted codes) on one data set,
AUC / UAUC overall, warm and cold, into <run dir>/paper/ (metrics.md, metrics.json, test_scores.parquet,
auc_bars.png, valid_auc.png, score_dist.png). A rerun of the same run.name reuses finished methods.

    python -m jobs.paper_table --config cluster/presets/paper_ml1m.yaml --config cluster/presets/paper_ml1m_cpu.yaml
    python -m jobs.paper_table --config cluster/presets/paper_ml1m.yaml --config cluster/presets/paper_ml1m_gpu.yaml
"""
from __future__ import annotations

from binllm.cli import run_job
from binllm.config import Config
from binllm.paper import run_paper_table


def run(cfg: Config):
    table = run_paper_table(cfg)
    print(table.text)
    print(f"\nreport: {cfg.run_dir()}/paper/metrics.md ({table.seconds:.0f} s)")
    return table


if __name__ == "__main__":
    run_job(run, __doc__)

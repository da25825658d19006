"""Score (nightly): click scores for explicit (user, item) requests or top-K candidates of active users,
written as Parquet under <output>/dt=YYYY-MM-DD/ with a manifest, replacing that date atomically.

    python -m jobs.score --config ray_config.yaml --set score.dt=2026-11-26 --set score.requests=s3://b/req.parquet
    ray job submit --working-dir . -- python -m jobs.score --config ray_config.yaml

Joins the Ray cluster named by RAY_ADDRESS (as under `ray job submit`), else starts a local Ray.
"""
from __future__ import annotations

from binllm.cli import init_ray, run_job
from binllm.config import Config
from binllm.pipeline import ScoringSummary, run_scoring


def run(cfg: Config) -> ScoringSummary:
    init_ray()
    summary = run_scoring(cfg)
    print(summary.line(), flush=True)
    return summary


if __name__ == "__main__":
    run_job(run, __doc__)

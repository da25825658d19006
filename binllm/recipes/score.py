"""Score (nightly): click scores for explicit (user, item) requests or top-K candidates of active users,
written as Parquet under <output>/dt=YYYY-MM-DD/ with a manifest, replacing that date atomically.

    binllm score --config ray_config.yaml --set score.dt=2026-11-26 --set score.requests=s3://b/req.parquet
    ray job submit --working-dir . -- python -m jobs.score --config ray_config.yaml

Joins the Ray cluster named by RAY_ADDRESS (as under `ray job submit`), else starts a local Ray.
"""
from __future__ import annotations

from binllm.config import Config
from binllm.pipeline import ScoringSummary, run_scoring

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "score")


def setup(cfg: Config) -> None:
    from binllm.ray_env import init_ray

    init_ray()


def run(cfg: Config, _: None = None) -> ScoringSummary:
    return run_scoring(cfg)


def publish(cfg: Config, summary: ScoringSummary) -> ScoringSummary:
    print(summary.line(), flush=True)  # run_scoring has published the partition and its manifest
    return summary


def main(cfg: Config) -> ScoringSummary:
    return publish(cfg, run(cfg, setup(cfg)))

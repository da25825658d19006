import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import log_loss as sklearn_log_loss
from sklearn.metrics import roc_auc_score

from binllm.metrics import (PAPER_PAIRS, _bootstrap_aucs, auc, calibration_error, evaluate_scores, format_pairs,
                            format_report, log_loss, match_pairs, paired_bootstrap_auc_diff, pairwise_report,
                            report_table, uauc, uauc_users)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)  # many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_uauc_hand_computed_case():
    # user a: pos 0.9, neg 0.1, neg 0.95 -> AUC 0.5; user b: pos 0.3 > neg 0.2 -> 1.0; user c: one class, skipped
    users = ["a", "a", "a", "b", "b", "c", "c"]
    labels = [1, 0, 0, 1, 0, 1, 1]
    scores = [0.9, 0.1, 0.95, 0.3, 0.2, 0.5, 0.1]
    assert uauc(users, labels, scores) == pytest.approx(0.75)


def test_uauc_equals_mean_of_sklearn_per_user():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 2000).astype(str)
    labels = rng.integers(0, 2, 2000)
    scores = rng.normal(size=2000) + 0.5 * labels
    expected = []
    for u in np.unique(users):
        m = users == u
        if len(set(labels[m])) == 2:
            expected.append(roc_auc_score(labels[m], scores[m]))
    assert uauc(users, labels, scores) == pytest.approx(np.mean(expected), abs=1e-12)


def test_single_class_gives_nan_and_report_prints_dash():
    assert math.isnan(auc([1, 1], [0.1, 0.2]))
    examples = pa.table({"user_id": ["a", "a", "b", "b"], "label": pa.array([1, 0, 1, 0], pa.int8()),
                         "warm": [True, True, True, True]})
    result = evaluate_scores(examples, np.array([0.9, 0.1, 0.2, 0.8]))
    assert result["all_auc"] == pytest.approx(0.75) and result["warm_uauc"] == pytest.approx(0.5)
    assert math.isnan(result["cold_auc"]) and result["cold_rows"] == 0
    text = format_report(report_table({"BinMF": result}))
    assert "BinMF" in text.splitlines()[2] and "-" in text.splitlines()[2]


def test_nan_scores_get_no_auc():
    assert np.isnan(auc([0, 1, 1], [0.1, float("nan"), 0.3]))


def test_uauc_users_counts_users_with_both_classes():
    users = ["a", "a", "a", "b", "b", "c", "c", "d"]
    labels = [1, 0, 0, 1, 0, 1, 1, 0]
    assert uauc_users(users, labels) == 2
    assert uauc_users([], []) == 0
    examples = pa.table({"user_id": users, "label": pa.array(labels, pa.int8()),
                         "warm": [True, True, True, False, False, True, True, False]})
    result = evaluate_scores(examples, np.array([2.0, -1.0, 3.0, 0.5, -0.5, 1.0, 1.0, -2.0]))
    assert (result["all_uauc_users"], result["warm_uauc_users"], result["cold_uauc_users"]) == (2, 1, 1)
    assert result["all_log_loss"] == pytest.approx(log_loss(labels, [2.0, -1.0, 3.0, 0.5, -0.5, 1.0, 1.0, -2.0]))
    assert 0.0 <= result["all_ece"] <= 1.0


def test_log_loss_hand_computed_stable_and_as_sklearn():
    # label 1 at logit 0: ln 2; label 0 at logit ln 3 (p = 0.75): ln 4
    assert log_loss([1, 0], [0.0, math.log(3.0)]) == pytest.approx(1.5 * math.log(2.0), abs=1e-12)
    assert log_loss([0, 1], [1000.0, 1000.0]) == pytest.approx(500.0)  # no overflow, no inf
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1000)
    logits = rng.normal(size=1000) * 3 + labels
    expected = sklearn_log_loss(labels, 1.0 / (1.0 + np.exp(-logits)))
    assert log_loss(labels, logits) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(log_loss([0, 1], [0.5, float("nan")]))
    with pytest.raises(ValueError, match="labels"):
        log_loss([0, 2], [0.0, 0.0])


def test_ece_equal_mass_bins_hand_computed():
    # p = 0.2, 0.2 | 0.8, 0.8 in two equal-mass bins: |0.5 - 0.2| and |1 - 0.8|, each half the rows
    logits = np.log(np.array([0.2, 0.2, 0.8, 0.8]) / (1 - np.array([0.2, 0.2, 0.8, 0.8])))
    assert calibration_error([0, 1, 1, 1], logits, bins=2) == pytest.approx(0.25)
    assert math.isnan(calibration_error([0, 1], [float("nan"), 0.0]))


def test_ece_of_calibrated_scores_is_small_and_of_shifted_scores_large():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=20000) * 1.5
    labels = (rng.random(20000) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)
    calibrated, shifted = calibration_error(labels, logits), calibration_error(labels, logits + 1.5)
    assert calibrated < 0.02
    assert shifted > 0.1 and shifted > 5 * calibrated


def test_report_shows_users_log_loss_and_ece():
    examples = pa.table({"user_id": ["a", "a", "b", "b"], "label": pa.array([1, 0, 1, 0], pa.int8()),
                         "warm": [True, True, False, False]})
    table = report_table({"MF": evaluate_scores(examples, np.array([1.0, -1.0, 0.5, 0.0]))})
    assert table.column_names[:10] == ["method", "all_auc", "all_uauc", "warm_auc", "warm_uauc", "cold_auc",
                                       "cold_uauc", "all_rows", "warm_rows", "cold_rows"]
    new = {"all_uauc_users", "warm_uauc_users", "cold_uauc_users", "all_log_loss", "all_ece"}
    assert new <= set(table.column_names)
    header, _, row = format_report(table).splitlines()
    assert header.split()[:4] == ["method", "AUC", "UAUC", "users"] and header.endswith("log loss     ECE")
    assert row.split()[1:4] == ["1.0000", "1.0000", "2"]
    assert row.split()[-2] == f"{log_loss([1, 0, 1, 0], [1.0, -1.0, 0.5, 0.0]):.4f}"


def _planted(n=2000, seed=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return labels, labels + rng.normal(size=n), rng.normal(size=n)


def test_bootstrap_interval_excludes_zero_for_a_clearly_better_method():
    labels, good, noise = _planted()
    result = paired_bootstrap_auc_diff(labels, good, noise, n_boot=1000, seed=0)
    true_diff = 0.7602 - 0.5  # Phi(1 / sqrt 2) - 1/2: the population AUCs
    assert result["diff"] == pytest.approx(auc(labels, good) - auc(labels, noise))
    assert result["low"] < result["diff"] < result["high"]
    assert result["low"] <= true_diff <= result["high"]
    assert result["low"] > 0 and result["p_le_0"] == 0.0
    assert (result["n_rows"], result["n_boot"]) == (2000, 1000)
    flipped = paired_bootstrap_auc_diff(labels, noise, good, n_boot=1000, seed=0)
    assert flipped["high"] < 0 and flipped["p_le_0"] == 1.0


def test_bootstrap_of_identical_methods_is_exactly_zero_and_repeatable():
    labels, good, noise = _planted()
    same = paired_bootstrap_auc_diff(labels, good, good.copy(), n_boot=200, seed=1)
    assert same["diff"] == 0.0 and same["low"] == 0.0 == same["high"] and same["p_le_0"] == 1.0
    a = paired_bootstrap_auc_diff(labels, good, good + noise, n_boot=300, seed=7)
    assert a == paired_bootstrap_auc_diff(labels, good, good + noise, n_boot=300, seed=7)
    assert a["low"] != paired_bootstrap_auc_diff(labels, good, good + noise, n_boot=300, seed=8)["low"]
    assert a["low"] <= a["diff"] <= a["high"]


def test_bootstrap_aucs_are_the_rank_auc_of_each_resample():
    labels, good, _ = _planted(n=300)
    scores = np.round(good, 1)  # ties
    boot = _bootstrap_aucs(labels, [scores], 20, seed=5)
    rng = np.random.default_rng(5)
    for k in range(20):
        rows = rng.integers(0, 300, 300)
        assert boot[0, k] == pytest.approx(roc_auc_score(labels[rows], scores[rows]), abs=1e-12)


def test_bootstrap_skips_one_class_resamples_and_nan_scores():
    result = paired_bootstrap_auc_diff([1, 0, 0, 0, 0], [0.9, 0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5],
                                       n_boot=200, seed=0)
    assert result["diff"] == 1.0  # AUC 1 - AUC 0
    assert 0 < result["n_boot"] < 200  # about (4/5)^5 of the resamples have no positive
    nan = paired_bootstrap_auc_diff([1, 0, 1, 0], [1, 0, 1, 0], [1, float("nan"), 0, 0], n_boot=10)
    assert math.isnan(nan["diff"]) and math.isnan(nan["low"])
    with pytest.raises(ValueError, match="labels"):
        paired_bootstrap_auc_diff([1, 0], [0.1, 0.2], [0.3])


def test_match_pairs_by_exact_name_or_per_code_format():
    assert match_pairs(PAPER_PAIRS, ["MF", "BinMF", "BinLLM"]) == [("BinLLM", "BinMF"), ("BinMF", "MF")]
    methods = ["MF", "BinMF", "TO", "IO (binary)", "IO (dotted)", "BinLLM (binary)", "BinLLM (dotted)"]
    assert match_pairs([("BinLLM", "BinMF"), ("BinLLM", "IO"), ("BinLLM", "IT"), ("TO", "MF")], methods) == [
        ("BinLLM (binary)", "BinMF"), ("BinLLM (dotted)", "BinMF"),
        ("BinLLM (binary)", "IO (binary)"), ("BinLLM (dotted)", "IO (dotted)"), ("TO", "MF")]
    assert match_pairs([("BinLLM", "BinMF")], ["BinLLM (binary)", "BinMF"]) == [("BinLLM (binary)", "BinMF")]
    assert match_pairs([("BinLLM", "BinMF")], ["BinLLMx", "BinMF"]) == []


def test_pairwise_report_and_its_text():
    labels, good, noise = _planted()
    table = pairwise_report({"BinLLM": good, "BinMF": noise, "MF": noise * 0.5}, labels,
                            [("BinLLM", "BinMF"), ("BinLLM", "IO"), ("BinMF", "MF")], n_boot=200, seed=0)
    assert table.column_names == ["a", "b", "diff", "low", "high", "p_le_0", "rows", "resamples"]
    rows = table.to_pylist()
    assert [(r["a"], r["b"]) for r in rows] == [("BinLLM", "BinMF"), ("BinMF", "MF")]  # IO is absent
    single = paired_bootstrap_auc_diff(labels, good, noise, n_boot=200, seed=0)
    assert (rows[0]["diff"], rows[0]["low"], rows[0]["high"]) == (single["diff"], single["low"], single["high"])
    assert rows[1]["diff"] == 0.0 and rows[1]["rows"] == 2000 and rows[1]["resamples"] == 200
    heading, *lines = format_pairs(table).splitlines()
    assert heading.startswith("AUC difference on the same test rows, paired bootstrap 95% interval (200 resamples)")
    assert len(lines) == 2
    r = rows[0]
    assert lines[0] == (f"BinLLM - BinMF  {r['diff']:+.4f}  [{r['low']:+.4f}, {r['high']:+.4f}]  "
                        f"P(<=0)={r['p_le_0']:.3f}  2000 rows")
    assert lines[1].startswith("BinMF - MF    ")
    assert format_pairs(pairwise_report({}, labels, PAPER_PAIRS, n_boot=10)) == ""

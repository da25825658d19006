import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from binllm.metrics import auc, evaluate_scores, format_report, report_table, uauc


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

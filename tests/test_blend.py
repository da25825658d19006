"""The post-hoc logistic blend of methods' logits: the fit, its saved form, refused inputs."""
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from binllm.blend import L2, Blend, fit_blend
from binllm.metrics import auc


def _logistic_rows(n, seed, w=(2.0, -1.0), b=0.3, scales=(1.0, 5.0)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)) * np.array(scales) + np.array([1.0, -2.0])
    p = 1.0 / (1.0 + np.exp(-(x @ (np.array(w) / np.array(scales)) + b)))
    return x, (rng.random(n) < p).astype(np.int8)


def test_fit_recovers_a_known_logistic_model():
    x, y = _logistic_rows(20000, seed=0)
    blend = fit_blend(x, y, names=["BinLLM", "BinMF"])
    raw = blend.weights / blend.std  # weights on the unstandardised features
    truth = np.array([2.0, -1.0]) / np.array([1.0, 5.0])
    assert raw @ truth / (np.linalg.norm(raw) * np.linalg.norm(truth)) > 0.999
    np.testing.assert_allclose(raw, truth, rtol=0.1)
    # the same penalised fit as scikit-learn's (C * sum of losses + |w|^2 / 2) on the standardised features
    z = (x - blend.mean) / blend.std
    reference = LogisticRegression(C=1.0 / (L2 * len(y)), tol=1e-12, max_iter=10000).fit(z, y)
    np.testing.assert_allclose(blend.weights, reference.coef_[0], atol=1e-5)
    assert blend.bias == pytest.approx(reference.intercept_[0], abs=1e-5)


def test_blend_is_at_least_as_good_as_the_better_single_method():
    rng = np.random.default_rng(1)
    n = 6000
    latent = rng.normal(size=n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-2.0 * latent))).astype(np.int8)
    features = np.stack([latent + rng.normal(size=n) * 1.0, 3.0 * latent + rng.normal(size=n) * 4.0], axis=1)
    fit_rows, test_rows = slice(0, n // 2), slice(n // 2, n)
    blend = fit_blend(features[fit_rows], y[fit_rows])
    blended = blend.logits(features[test_rows])
    assert blended.dtype == np.float32 and blended.shape == (n // 2,)
    best_single = max(auc(y[test_rows], features[test_rows, j]) for j in range(2))
    assert auc(y[test_rows], blended) >= best_single


def test_dict_round_trip_through_json():
    x, y = _logistic_rows(2000, seed=2)
    blend = fit_blend(x, y, names=["a", "b"])
    again = Blend.from_dict(json.loads(json.dumps(blend.to_dict())))
    assert again.names == ("a", "b")
    np.testing.assert_array_equal(again.logits(x), blend.logits(x))
    with pytest.raises(ValueError, match="one entry per feature"):
        Blend.from_dict({**blend.to_dict(), "names": ["a"]})


def test_constant_feature_and_one_column():
    x, y = _logistic_rows(2000, seed=3)
    blend = fit_blend(np.c_[x[:, 0], np.ones(len(x))], y)
    assert blend.std[1] == 1.0 and abs(blend.weights[1]) < 1e-6
    assert fit_blend(x[:, 0], y).logits(x[:, 0]).shape == (2000,)


def test_bad_inputs_are_refused_with_the_problem_named():
    x, y = _logistic_rows(100, seed=4)
    with pytest.raises(ValueError, match="one class"):
        fit_blend(x, np.ones(100))
    with pytest.raises(ValueError, match="NaN"):
        fit_blend(np.where(np.arange(200).reshape(100, 2) == 5, np.nan, x), y)
    with pytest.raises(ValueError, match="99 feature rows"):
        fit_blend(x[:99], y)
    with pytest.raises(ValueError, match="0 or 1"):
        fit_blend(x, y * 2)
    with pytest.raises(ValueError, match="3 names"):
        fit_blend(x, y, names=["a", "b", "c"])
    with pytest.raises(ValueError, match="fitted on 2"):
        fit_blend(x, y).logits(x[:, :1])

"""The evaluate report's pairwise part: pairs.parquet and the pair lines in metrics.md, row alignment checks."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm.config import load_config
from binllm.metrics import auc, format_pairs, format_report
from binllm import evaluation


def _scores(n=400, seed=0, methods=("MF", "BinMF", "BinLLM")):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int8)
    rows = {"user_id": rng.integers(0, 20, n).astype(str), "item_id": np.arange(n).astype(str),
            "timestamp": np.arange(n, dtype=np.int64), "label": labels, "warm": rng.random(n) < 0.7}
    strength = {"MF": 0.2, "BinMF": 0.5, "BinLLM": 2.0}
    tables = [evaluation.long_scores(pa.table(rows), m, labels * strength[m] + rng.normal(size=n)) for m in methods]
    return pa.concat_tables(tables)


def test_write_report_writes_the_pairs_of_the_paper(tmp_path):
    cfg = load_config(None, ["run.name=ev", f"run.output_root={tmp_path}", "run.seed=3"])
    scores = _scores()
    table, text = evaluation.write_report(scores, cfg.run_dir(), cfg.run.seed, cfg.storage)
    pairs = pq.read_table(tmp_path / "ev/eval/pairs.parquet").to_pylist()
    assert [(p["a"], p["b"]) for p in pairs] == [("BinLLM", "BinMF"), ("BinMF", "MF")]
    logit = lambda m: scores.filter(pa.compute.equal(scores["method"], m))["logit"].to_numpy()
    labels = scores.filter(pa.compute.equal(scores["method"], "MF"))["label"].to_numpy()
    first = pairs[0]
    assert first["diff"] == pytest.approx(auc(labels, logit("BinLLM")) - auc(labels, logit("BinMF")))
    assert 0 < first["low"] < first["diff"] < first["high"] and first["resamples"] == 1000 and first["rows"] == 400
    assert evaluation.pairs_table(scores, 3).to_pylist() == pairs  # seeded with run.seed
    md = (tmp_path / "ev/eval/metrics.md").read_text()
    assert format_report(table) in md and "BinLLM - BinMF" in md and "P(<=0)=" in md
    assert text in md and "95% interval (1000 resamples)" in text
    assert table.column("all_uauc_users").to_pylist() == [20.0, 20.0, 20.0]


def test_pairs_need_the_same_rows_in_the_same_order():
    scores = _scores(n=50)
    mf = scores.filter(pa.compute.equal(scores["method"], "MF"))
    shuffled = pa.concat_tables([mf, *[scores.filter(pa.compute.equal(scores["method"], m)).take(
        np.r_[1, 0, 2:50]) for m in ("BinMF", "BinLLM")]])
    with pytest.raises(ValueError, match="method 'BinMF' did not score the same rows"):
        evaluation.pairs_table(shuffled, 0)
    # a method no pair involves is not checked, and an evaluation with no pair has no pair lines
    assert evaluation.pairs_table(pa.concat_tables([mf, mf.slice(0, 10).set_column(
        5, "method", pa.array(["other"] * 10))]), 0).num_rows == 0
    assert format_pairs(evaluation.pairs_table(mf, 0)) == ""


def test_blend_row_is_fitted_on_validation_scores_and_reported_against_both_parts(tmp_path):
    # BinMF and BinLLM each see half of the signal (independent noise): the blend of the two ranks better.
    def scores(n, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, n).astype(np.int8)
        rows = pa.table({"user_id": rng.integers(0, 50, n).astype(str), "item_id": np.arange(n).astype(str),
                         "timestamp": np.arange(n, dtype=np.int64), "label": labels, "warm": rng.random(n) < 0.5})
        return pa.concat_tables([evaluation.long_scores(rows, m, labels + rng.normal(size=n)) for m in ("BinMF", "BinLLM")])

    valid, test = scores(600, 1), scores(3000, 2)
    blended, blend = evaluation.add_blend(valid, test)
    assert blend.names == ("BinMF", "BinLLM") and (blend.weights > 0).all()
    assert blended.num_rows == test.num_rows + 3000
    assert blended.slice(0, test.num_rows).equals(test)
    cfg = load_config(None, ["run.name=ev", f"run.output_root={tmp_path}"])
    _, text = evaluation.write_report(blended, cfg.run_dir(), cfg.run.seed, cfg.storage)
    pairs = {(p["a"], p["b"]): p for p in evaluation.pairs_table(blended, 0).to_pylist()}
    assert pairs[("Blend", "BinMF")]["low"] > 0 and pairs[("Blend", "BinLLM")]["low"] > 0
    assert "Blend - BinMF" in text
    with pytest.raises(ValueError, match="no rows of method 'BinLLM'"):
        evaluation.add_blend(valid.filter(pa.compute.equal(valid["method"], "BinMF")), test)

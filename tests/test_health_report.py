"""The nightly health report (binllm.pipeline.health): PSI and top-K overlap on arrays with known values, and
through the real pipeline: a date scored, the next dates with the same model (quiet; a rerun compares against
the previous DATE) and with a shifted model (flagged; score.max_psi stops it before it publishes)."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import math
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from binllm import storage
from binllm.config import ConfigError, ScoreConfig
from binllm.llm import apply_lora, load_causal_lm, save_adapter
from binllm.pipeline import run_scoring
from binllm.pipeline.health import (DriftTooLarge, PreviousDate, check_drift, check_settings, health_report, psi,
                                    score_summary, top_k_overlap)
from binllm.pipeline.publish import published_dates, read_manifest, read_partition
from binllm.recipes.score import scoring_job
from pipeline_helpers import scoring_config, write_inputs
from ray_cluster import local_ray

D1, D2, D3 = "2026-11-25", "2026-11-26", "2026-11-27"


# --- the measures on synthetic arrays ---------------------------------------------------------------------------

def test_psi_on_known_values():
    previous = np.arange(100.0)  # equal-mass edges 9.9, 19.8, ..., 89.1: ten values per bin
    assert psi(previous, previous) == 0.0
    # Everything in the first bin: a = (1, 0 x 9) with the empty bins floored at 1e-4, e = 0.1 each.
    assert psi(previous, np.zeros(100)) == pytest.approx(0.9 * math.log(10) + 9 * (1e-4 - 0.1) * math.log(1e-3))
    assert psi(previous, np.zeros(100)) == pytest.approx(8.283089, abs=1e-6)
    # Shifted by 10: bin 0 empty, bins 1-8 hold 10% each, the last bin 20%.
    assert psi(previous, previous + 10) == pytest.approx((1e-4 - 0.1) * math.log(1e-3) + 0.1 * math.log(2))
    assert psi(previous, previous + 10) == pytest.approx(0.759399, abs=1e-6)
    # The bins are the previous date's quantiles: scaling both sides changes nothing; the order matters.
    assert psi(previous * 7, previous * 7 + 70) == pytest.approx(psi(previous, previous + 10))
    # Today only the lower half: five bins at 20%, five empty.
    assert psi(previous, previous[:50]) == pytest.approx(5 * 0.1 * math.log(2) + 5 * (1e-4 - 0.1) * math.log(1e-3))
    assert psi(previous[:50], previous) != pytest.approx(psi(previous, previous[:50]))
    with pytest.raises(ValueError, match="non-empty"):
        psi(previous, [])


def _rows(triples):
    users, items, scores = zip(*triples)
    return pa.table({"user_id": list(users), "item_id": list(items), "score": pa.array(scores, pa.float32())})


def test_top_k_overlap_on_known_values():
    before = _rows([("a", "x", .9), ("a", "y", .8), ("a", "z", .1), ("b", "p", .5), ("b", "q", .4), ("c", "r", .3)])
    after = _rows([("a", "x", .1), ("a", "y", .9), ("a", "z", .8), ("b", "p", .3), ("b", "q", .6), ("d", "r", .3)])
    # a: top-2 {x, y} then {y, z}: 1/3; b: {p, q} both days: 1; c and d are on one date only.
    assert top_k_overlap(before, after, 2) == {"metric": "mean_jaccard", "k": 2, "mean": pytest.approx(2 / 3, abs=1e-6),
                                               "common_users": 2}
    # k=1: a {x} vs {y}: 0; b {p} vs {q}: 0.
    assert top_k_overlap(before, after, 1)["mean"] == 0.0
    # Ties by item id: u's top-1 is "m" on both dates.
    tied = _rows([("u", "n", .5), ("u", "m", .5)])
    assert top_k_overlap(tied, tied, 1)["mean"] == 1.0
    assert top_k_overlap(before, _rows([("e", "x", .5)]), 2) == {"metric": "mean_jaccard", "k": 2, "mean": None,
                                                                 "common_users": 0}


def test_score_summary_and_report_values():
    table = _rows([("a", "x", .1), ("a", "y", .2), ("a", "z", .3), ("b", "p", .4)]).append_column(
        "fallback", pa.array([True, False, False, False]))
    summary = score_summary(table)
    assert summary["rows"] == 4 and summary["users"] == 2 and summary["fallback_share"] == 0.25
    assert summary["mean"] == pytest.approx(0.25, abs=1e-6)
    assert summary["pairs_per_user"] == {"min": 1, "median": 2.0, "max": 3}
    assert summary["quantiles"]["p50"] == pytest.approx(0.25, abs=1e-6)
    assert summary["quantiles"]["p1"] == pytest.approx(0.1 + 0.03 * 0.1, abs=1e-6)  # numpy's linear interpolation
    alone = health_report(table, None, D2, 2)
    assert alone["drift"] == {"previous_dt": None, "previous_run_id": None, "psi": None, "top_k_overlap": None,
                              "reason": f"no date before {D2} is published under this output"}
    report = health_report(table, PreviousDate(D1, "r1", table.select(["user_id", "item_id", "score"])), D2, 2)
    assert report["drift"]["psi"] == 0.0 and report["drift"]["top_k_overlap"]["mean"] == 1.0
    assert report["drift"]["previous_dt"] == D1 and report["drift"]["previous_run_id"] == "r1"


@pytest.mark.reliability(kind="bad input", what="score.max_psi below 0 or score.drift_top_k below 1",
                         outcome="ConfigError naming the key and what it expects; nothing scored")
def test_drift_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^config key 'score.max_psi': expected >= 0 \(0: off\), got -0.1$"):
        check_settings(ScoreConfig(max_psi=-0.1))
    with pytest.raises(ConfigError, match=r"^config key 'score.drift_top_k': expected >= 1, got 0$"):
        check_settings(ScoreConfig(drift_top_k=0))
    report = {"drift": {"psi": 0.3, "previous_dt": D1}}
    check_drift(report, 0.0, D2)  # off
    check_drift(report, 0.3, D2)  # not above
    with pytest.raises(DriftTooLarge):
        check_drift(report, 0.29, D2)


# --- through the pipeline ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    with local_ray(progress_bars=False):
        yield


def write_adapter(root: str, llm_dir, folder: str, scale: float) -> None:
    """A LoRA adapter like write_inputs' (same seed) with its B matrices scaled: the same model, shifted scores."""
    model, _ = load_causal_lm(llm_dir, dtype="float32")
    peft = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param, generator=torch.Generator().manual_seed(7)) * scale)
    with tempfile.TemporaryDirectory() as tmp:
        storage.upload_dir(save_adapter(peft, tmp), f"{root}/{folder}")


def score_date(root, llm_dir, dt, **extra):
    return run_scoring(scoring_job(scoring_config(root, llm_dir, **{"score.dt": dt, "score.drift_top_k": 2} | extra)))


def drift_of(out: str, before: str, after: str) -> float:
    return psi(read_partition(out, before).column("score").to_numpy(),
               read_partition(out, after).column("score").to_numpy())


@pytest.fixture(scope="module")
def dates(ray_local, tmp_path_factory, tiny_llm_dir):
    """D1, D2 and D2 again scored with one model into one output; the shifted-model test goes on from there."""
    root = tmp_path_factory.mktemp("health")
    users = len(set(write_inputs(str(root), tiny_llm_dir)["requests"]["user_id"].to_pylist()))
    runs = {name: score_date(str(root), tiny_llm_dir, dt) for name, dt in (("first", D1), ("second", D2),
                                                                          ("rerun", D2))}
    return {"root": root, "out": f"{root}/nightly/scores", "users": users, **runs}


def test_same_model_is_quiet_and_a_rerun_compares_with_the_previous_date(dates):
    root, out, first = dates["root"], dates["out"], dates["first"]
    manifest = read_manifest(out, D1)
    assert manifest["health"]["drift"]["psi"] is None and manifest["health"]["drift"]["reason"]
    scores = read_partition(out, D1).column("score").to_numpy()
    summary = manifest["health"]["scores"]
    assert summary["rows"] == 43 and summary["fallback_share"] == pytest.approx(first.fallbacks / 43, abs=1e-6)
    assert summary["quantiles"]["p95"] == pytest.approx(float(np.quantile(scores.astype(np.float64), 0.95)), abs=1e-6)
    png = (root / "nightly" / "scores" / manifest["health"]["plot"]).read_bytes()
    assert manifest["health"]["plot"] == f"dt={D1}/run={first.run_id}/_health.png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    # The PNG is no data file: not in the manifest's files, not in a plain hive reader's rows.
    assert all(f["path"].endswith(".parquet") for f in manifest["files"])
    assert pads.dataset(out, format="parquet", partitioning="hive").to_table().num_rows == 2 * 43

    drift = dates["second"].manifest["health"]["drift"]
    assert (drift["previous_dt"], drift["previous_run_id"]) == (D1, first.run_id)
    assert drift["psi"] < 0.01
    assert drift["top_k_overlap"] == {"metric": "mean_jaccard", "k": 2, "mean": 1.0, "common_users": dates["users"]}

    rerun = dates["rerun"]  # compares with D1, not with the superseded run of D2
    drift = read_manifest(out, D2)["health"]["drift"]
    assert rerun.run_id != dates["second"].run_id and read_manifest(out, D2)["run_id"] == rerun.run_id
    assert (drift["previous_dt"], drift["previous_run_id"]) == (D1, first.run_id)
    assert drift["psi"] == pytest.approx(drift_of(out, D1, D2), abs=1e-6) and drift["psi"] < 0.01
    assert "PSI 0.0" in rerun.line() and f"vs dt={D1}" in rerun.line()


@pytest.mark.reliability(kind="bad input", what="a model whose scores drifted from the previous published date past "
                                                "score.max_psi",
                         outcome="the run fails before publishing, one line naming score.max_psi, the PSI and both "
                                 "dates; published dates untouched, nothing of the run left")
def test_a_shifted_model_is_flagged_and_max_psi_stops_it(dates, tiny_llm_dir):
    root, out = str(dates["root"]), dates["out"]
    write_adapter(root, tiny_llm_dir, "shifted", scale=3.0)
    before = read_manifest(out, D2)
    shifted = {"tune.adapter": f"{root}/shifted"}
    with pytest.raises(DriftTooLarge) as failed:
        score_date(root, tiny_llm_dir, D3, **shifted, **{"score.max_psi": 0.25})
    assert published_dates(out) == [D1, D2] and read_manifest(out, D2) == before
    assert storage.list_files(f"{out}/dt={D3}", suffix="") == []  # nothing of the failed run remains

    published = score_date(root, tiny_llm_dir, D3, **shifted)  # the same scores without the limit: published
    drift = published.manifest["health"]["drift"]
    assert drift["previous_dt"] == D2 and drift["psi"] == pytest.approx(drift_of(out, D2, D3), abs=1e-6)
    assert drift["psi"] > 0.25 and drift["top_k_overlap"]["mean"] < 1.0
    assert str(failed.value) == (
        f"score.max_psi 0.25 exceeded: the PSI of the scores of dt={D3} against the previous published date "
        f"dt={D2} is {drift['psi']:.4f}; the run was not published (the published results are left as they were)")

"""The scoring actor on its own (no Ray): it scores through the shared-prefix path by default."""
import numpy as np
import pyarrow as pa
import pytest

from binllm import storage
from binllm.pipeline import scorer as scorer_module
from binllm.pipeline.scorer import Scorer, ScorerSpec
from binllm.prompts import build_prompts
from pipeline_helpers import expected_logits, histories_before, scoring_config, write_inputs


@pytest.mark.parametrize("shared", [True, False])
def test_scorer_uses_the_configured_path_and_shared_is_the_default(tmp_path, tiny_llm_dir, monkeypatch, shared):
    root = str(tmp_path)
    data = write_inputs(root, tiny_llm_dir)
    cfg = scoring_config(root, tiny_llm_dir, **({} if shared else {"score.shared_prefix": False}))
    calls = []
    real = scorer_module.score_prompts

    def recording(*args, **kwargs):
        calls.append(kwargs["shared_prefix"])
        return real(*args, **kwargs)

    monkeypatch.setattr(scorer_module, "score_prompts", recording)
    req = data["requests"]
    hist = histories_before(data["examples"], 2**62, 5)
    rows = req.append_column("history", pa.array([hist.get(u, []) for u in req["user_id"].to_pylist()],
                                                  pa.list_(pa.string())))
    actor = Scorer(ScorerSpec.for_score(cfg.score, cfg.llm, cfg.storage, adapter=f"{root}/adapter", model_version="v1",
                                        run_id="run1"))
    batch = build_prompts(rows, data["items"], storage.read_table(f"{root}/codes/users.parquet"),
                          storage.read_table(f"{root}/codes/items.parquet"), cfg.prompt, tokenizer=actor.tokenizer)
    out = actor(pa.table({"user_id": req["user_id"], "item_id": req["item_id"], "prefix": batch.prefix,
                          "suffix": batch.suffix, "fallback": batch.fallback}))
    assert calls == [shared]
    want, _ = expected_logits(cfg, rows, data["items"], root)
    np.testing.assert_allclose(out.column("logit").to_numpy(), want, atol=1e-5)
    assert out.schema == scorer_module.SCORE_SCHEMA and out.column("run_id")[0].as_py() == "run1"

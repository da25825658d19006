"""Training and both scorers see the same tokens for the same rows, hostile titles and token caps included.

Training: binllm.tune.tokenize_rows. Evaluation: binllm.evaluation.llm_logits. Nightly scoring:
the pipeline's PairBuilder (histories from the interaction log) then the Scorer actor. The scorers' tokens
are recorded where they enter the model (binllm.llm.scoring.score_encoded).
"""
import tempfile

import pyarrow as pa
import pytest

from binllm import storage
from binllm.config import load_config
from binllm.llm import apply_lora, load_causal_lm, save_adapter, scoring
from binllm.pipeline.pairs import PairBuilder, PairSpec, normalise_log, normalise_requests
from binllm.pipeline.scorer import Scorer, ScorerSpec
from binllm import evaluation
from binllm.tune import tokenize_rows
from test_prompts import HOSTILE_CODES, HOSTILE_HISTORY, HOSTILE_ITEMS, HOSTILE_ROWS, USER

MAX_TITLE_TOKENS, MAX_TOKENS = 20, 150


@pytest.fixture
def recorded(monkeypatch):
    """Every token sequence a scorer hands to the model, in the order it was handed over."""
    calls: list[list[list[int]]] = []
    real = scoring.score_encoded

    def recording(model, encoded, **kwargs):
        calls.append(encoded.sequences())
        return real(model, encoded, **kwargs)

    monkeypatch.setattr(scoring, "score_encoded", recording)
    return calls


@pytest.mark.reliability(kind="bad input", what="hostile and 3,000-character titles, prompts over prompt.max_tokens",
                         outcome="training and both scorers tokenise the same rows identically")
def test_training_and_both_scorers_tokenise_the_same_rows_identically(tmp_path, tiny_llm_dir, recorded):
    root = str(tmp_path)
    storage.write_table(HOSTILE_ITEMS, f"{root}/examples/items.parquet")
    storage.write_table(USER, f"{root}/codes/users.parquet")
    storage.write_table(HOSTILE_CODES, f"{root}/codes/items.parquet")
    model, tokenizer = load_causal_lm(tiny_llm_dir, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        storage.upload_dir(save_adapter(apply_lora(model, r=4, alpha=8, dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]), tmp), f"{root}/adapter")
    cfg = load_config(None, [f"llm.model={tiny_llm_dir}", "llm.dtype=float32", "data.history_len=6",
                             f"prompt.max_title_tokens={MAX_TITLE_TOKENS}", f"prompt.max_tokens={MAX_TOKENS}"])
    n = HOSTILE_ROWS.num_rows
    rows = HOSTILE_ROWS.append_column("label", pa.array([1, 0, 1], pa.int8())).append_column(
        "timestamp", pa.array([100] * n, pa.int64())).append_column("warm", pa.array([True] * n))
    keys = list(zip(rows["user_id"].to_pylist(), rows["item_id"].to_pylist()))

    trained = tokenize_rows(rows, HOSTILE_ITEMS, USER, HOSTILE_CODES, cfg.prompt, cfg.prompt.kind, tokenizer)[0].token_ids

    evaluation.llm_logits(rows, HOSTILE_ITEMS, USER, HOSTILE_CODES, prompt=cfg.prompt, llm=cfg.llm, score=cfg.score,
                          model=model, tokenizer=tokenizer)
    (evaluated,) = recorded

    # The pipeline builds the same histories from an interaction log: the positives before the cutoff.
    log = pa.table({"user_id": ["u1"] * 6 + ["u2"] * 6, "item_id": HOSTILE_HISTORY * 2,
                    "timestamp": list(range(1, 7)) * 2, "label": [1] * 12})
    block = pa.concat_tables([normalise_log(log, history_before=50, min_rating=0.0),
                              normalise_requests(HOSTILE_ROWS.select(["user_id", "item_id"]))])
    pairs = PairBuilder(PairSpec(key="paths", items=f"{root}/examples/items.parquet",
                                 user_codes=f"{root}/codes/users.parquet", item_codes=f"{root}/codes/items.parquet",
                                 storage=cfg.storage, prompt=cfg.prompt, history_len=6, top_k=1, popular=[],
                                 tokenizer=tokenizer))(block)
    Scorer(ScorerSpec.for_score(cfg.score, cfg.llm, cfg.storage, adapter=f"{root}/adapter", model_version="v1",
                                run_id="run1"))(pairs)
    piped = dict(zip(zip(pairs["user_id"].to_pylist(), pairs["item_id"].to_pylist()), recorded[1]))

    assert len(trained) == len(evaluated) == len(piped) == n
    for i, key in enumerate(keys):
        assert trained[i] == evaluated[i] == piped[key], key
        assert len(trained[i]) <= MAX_TOKENS
    uncapped = tokenize_rows(rows, HOSTILE_ITEMS, USER, HOSTILE_CODES,
                             load_config(None, ["prompt.max_title_tokens=0", "prompt.max_tokens=0"]).prompt, "full",
                             tokenizer)[0].token_ids
    assert all(len(u) > MAX_TOKENS for u in uncapped)  # the caps did bind on every row

"""The LLM path learns what it is given: codes when the signal is in the codes, titles when it is in the
titles; and the score it is tuned on is the score both scorers return."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from binllm.codes import code_table
from binllm.config import load_config
from binllm.llm import collate_prompts, load_causal_lm, score_prompts, yes_logits
from binllm.metrics import auc
from binllm.prompts import build_prompts
from binllm.tune import split_rows, tokenize_rows, tune_lora
from synthetic import make_code_signal_examples, make_planted_examples

CODES_FLOOR = 0.75  # held-out AUC that codes-only tuning must reach on the code-signal set


def tune_and_test(data, llm_dir, kind, code_format="binary", epochs=2):
    examples, items, user_codes, item_codes = data
    cfg = load_config(None, [
        "tune.mode=intuitive", f"prompt.kind={kind}", f"prompt.code_format={code_format}",
        "tune.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        f"tune.stage2={{lr: 0.01, micro_batch_size: 16, epochs: {epochs}, eval_every: 25, patience: 10}}"])
    model, tokenizer = load_causal_lm(llm_dir)
    tuned = tune_lora(examples, items, user_codes, item_codes, tune=cfg.tune, prompt=cfg.prompt, llm=cfg.llm,
                      seed=cfg.run.seed, model=model, tokenizer=tokenizer)
    test = split_rows(examples, "test", 0, 0)
    prompts = build_prompts(test, items, user_codes, item_codes, cfg.prompt, tokenizer=tokenizer)
    scores = score_prompts(tuned.model, tokenizer, prompts.prefix, prompts.suffix, answer_id=tuned.answer)
    return auc(test.column("label").to_numpy(), scores), tuned


@pytest.fixture(scope="module")
def code_signal():
    return make_code_signal_examples(n_users=48, n_items=48, n_rows=1000, seed=0)


@pytest.fixture(scope="module")
def title_signal():
    """The label is whether the target title says "Space"; the codes are random."""
    examples, items = make_planted_examples(40, 30, 1000, seed=0, history_len=3)
    space = np.array(["Space" in t for t in items.column("title").to_pylist()])
    row_item = pc.index_in(examples.column("item_id"), items.column("item_id")).to_numpy()
    examples = examples.set_column(examples.schema.get_field_index("label"), "label",
                                   pa.array(space[row_item].astype(np.int8)))
    rng = np.random.default_rng(1)
    return (examples, items, code_table([f"u{k}" for k in range(40)], rng.integers(0, 256, (40, 4), dtype=np.uint8)),
            code_table([f"i{k}" for k in range(30)], rng.integers(0, 256, (30, 4), dtype=np.uint8)))


def test_codes_only_tuning_learns_a_function_of_the_codes(code_signal, tiny_llm_dir):
    held_out, _ = tune_and_test(code_signal, tiny_llm_dir, "codes")
    assert held_out >= CODES_FLOOR


def test_full_prompt_beats_text_only_when_the_signal_is_in_the_codes(code_signal, tiny_llm_dir):
    full, _ = tune_and_test(code_signal, tiny_llm_dir, "full", code_format="dotted")
    text, _ = tune_and_test(code_signal, tiny_llm_dir, "text")
    assert full >= CODES_FLOOR
    assert text < 0.6  # every title is the same: nothing to learn from text
    assert full > text + 0.15


def test_text_only_tuning_learns_a_signal_in_the_titles(title_signal, tiny_llm_dir):
    held_out, _ = tune_and_test(title_signal, tiny_llm_dir, "text", epochs=1)
    assert held_out >= 0.9


def test_the_tuned_score_is_the_scored_score(title_signal, tiny_llm_dir):
    """yes_logits (the training loss path) and both scorers give the same logit for the same prompts."""
    _, tuned = tune_and_test(title_signal, tiny_llm_dir, "full", epochs=1)
    examples, items, user_codes, item_codes = title_signal
    cfg = load_config(None, ["prompt.kind=full"])
    _, tokenizer = load_causal_lm(tiny_llm_dir)
    rows = split_rows(examples, "test", 40, 0)
    prompts, _ = tokenize_rows(rows, items, user_codes, item_codes, cfg.prompt, "full", tokenizer)
    model = tuned.model.eval()
    input_ids, mask = collate_prompts(prompts.token_ids, tokenizer.pad_token_id)
    with torch.no_grad():
        trained = yes_logits(model, input_ids, mask, tuned.answer).numpy()
    batch = build_prompts(rows, items, user_codes, item_codes, cfg.prompt, tokenizer=tokenizer)
    for shared in (True, False):
        scored = score_prompts(model, tokenizer, batch.prefix, batch.suffix, answer_id=tuned.answer,
                               shared_prefix=shared)
        np.testing.assert_allclose(scored, trained, atol=1e-5)
    assert tuned.answer.no is not None  # the default score is the Yes/No log-odds
    assert np.ptp(trained) > 0.1
